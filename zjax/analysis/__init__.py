"""Looking at a step before and after it runs: ``plan`` (memory per ZeRO stage, ``fit``),
``profile`` (compiled memory, collectives vs theory, timing), ``activations`` (what a remat
policy keeps), ``hlo`` (collectives and FLOPs from compiled HLO) and ``report`` (the
devices and processes JAX sees)."""
