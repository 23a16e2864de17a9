"""The operators' web console (/ui/): its sessions, its gate, what each page reads and
the pages themselves (manager.api.console.pages: the blueprint `create_app` registers)."""
