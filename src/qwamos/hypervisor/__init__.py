"""The hypervisor layer: VM configs (``config``), exact sizes (``sizes``), paths (``layout``), the ``info``
block (``info``), QEMU command lines (``qemu``), the KVM probe (``kvm``), processes (``process``,
``supervisor``) and the VM lifecycle (``manager``).  Config schema and behaviour: ``docs/vm-config.md``."""
