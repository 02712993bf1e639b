"""Archive hardware: profiles of supported layouts, host checks and sizing.

A *profile* (``hardware/*.toml``) states what a layout is expected to have:
the mount point, device, RAID level and capacity of each storage area, the
offline library's devices, the mirror's kind and the host's minimum memory,
cores and open-files limit. :mod:`.checks` compares the host (as
:mod:`.probe` reads it from ``/proc``, ``/sys`` and ``/dev``) with a
profile and the configuration; :mod:`.sizing` works out the capacity each
tier needs for a workload under the configured rules.

Modules:

- ``units``: sizes with decimal units, LTO generations;
- ``profile``: the profile format, loading and validation;
- ``procfs``, ``mdstat``: parsers of ``/proc`` files (pure);
- ``probe``: reads the host below an injectable root into HostFacts;
- ``site``: what the configuration says about the hardware;
- ``findings``, ``check_*``, ``checks``: the checks (pure);
- ``retention``, ``sizing``: the sizing (pure).
"""
