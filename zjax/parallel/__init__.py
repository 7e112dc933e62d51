"""Placement over the mesh: the named axes (``mesh``), logical-axis rules (``sharding``) and
ZeRO's per-parameter layout, per-stage strategy and collectives (``zero``)."""
