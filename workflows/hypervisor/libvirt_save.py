"""libvirt calls for the save strategies (mixed into LibvirtHypervisor).

Methods use ``self._call(what, fn)``, which maps libvirt errors to ours.
"""

from __future__ import annotations


class LibvirtSaveOps:
    pass
