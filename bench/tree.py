"""The plugins `make bench` measures: its own (bench/plugins) and the seed's file_watcher,
twice (prewarmed, and `prewarm: false` under another event type), reading a Markdown
file from a directory of the bench's own that they are allowed to read."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN = "# Bench notes\n\nA *Markdown* file of a few lines, as `file_watcher` gets them.\n" * 20


def plugin_tree(run_dir: Path, files: Path) -> tuple[Path, Path]:
    """(the plugins directory under `run_dir`, the Markdown file in `files`: a directory
    a run's uid can reach, as it reaches users' files)."""
    plugins = run_dir / "plugins"
    shutil.copytree(ROOT / "bench" / "plugins", plugins)
    files.chmod(0o755)
    markdown = files / "notes.md"
    markdown.write_text(MARKDOWN)
    markdown.chmod(0o644)
    for name, prewarm in (("file_watcher", True), ("file_watcher_cold", False)):
        target = plugins / name
        shutil.copytree(ROOT / "plugins" / "file_watcher", target)
        manifest_path = target / "plugin.yaml"
        manifest = yaml.safe_load(manifest_path.read_text())
        manifest["name"] = name
        manifest["permissions"]["fs"]["allow"] = [f"{files}/**"]
        if not prewarm:
            manifest["prewarm"] = False
            manifest["triggers"] = [{"topic": "fs.v1", "event_type": "file_created_cold"}]
        manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return plugins, markdown
