"""``domcapture chaos``: workflows under injected faults, then the invariants checked (docs/chaos.md).

- ``command``: the command's flags, their checks and its exit codes;
- ``runner``: the run (workload, faults, bring-back, invariants);
- ``domains``: throwaway and tagged domains, read through virsh;
- ``services``: the run's redis-server and workers, the host's libvirtd;
- ``report``: the table, the JSON and HTML report, and the difference of two.
"""
