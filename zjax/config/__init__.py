"""Configuration: the validated schema (``schema``: one pydantic section per block, layering
of ``base:`` files, ``key=value`` overrides), DeepSpeed's JSON keys mapped onto it
(``deepspeed``) and the remat policy names it validates (``remat``)."""
from zjax.config.schema import Config, load_config

__all__ = ["Config", "load_config"]
