"""One typed schema per tool: its keys, defaults, types and allowed values (see eidetic.config)."""
