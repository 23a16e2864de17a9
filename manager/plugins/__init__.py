"""Plugin loading: manifests, requirements and their install sandbox, files read through
descriptors, allowed paths, the registry in Redis, the cache janitor, scaffolding."""
