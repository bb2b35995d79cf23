"""Config files for tests: see ``ops.configfile``."""

from ops.configfile import default_config, dump_toml, merged, write_config

__all__ = ["default_config", "dump_toml", "merged", "write_config"]
