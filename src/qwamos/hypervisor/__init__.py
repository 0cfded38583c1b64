"""The hypervisor layer: VM configs (``config``), paths (``layout``), QEMU command lines (``qemu``), the KVM
probe (``kvm``), processes (``process``, ``supervisor``) and the VM lifecycle (``manager``)."""
