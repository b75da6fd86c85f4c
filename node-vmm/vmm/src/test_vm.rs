//! A bare VM for unit tests that run guest code on the real `/dev/kvm`:
//! 1 MiB of RAM at address 0 and vCPUs that enter 32-bit protected mode
//! code (the PVH entry state) at `0x10000 + 0x1000 * index`.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::regs::{self, EntryMode};

pub struct TestVm {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
}

impl TestVm {
    pub fn new() -> Self {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let region = mem.iter().next().unwrap();
        let r = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
        };
        // SAFETY: `mem` is a live mapping kept with the VM fd in this
        // struct; tests that clone it keep it mapped for as long as they
        // run the VM.
        unsafe { vm.set_user_memory_region(r) }.unwrap();
        Self { vm, mem }
    }

    /// vCPU `index`, about to run `code`.
    pub fn vcpu(&self, index: u8, code: &[u8]) -> VcpuFd {
        let entry = 0x1_0000 + 0x1000 * u64::from(index);
        self.mem.write_slice(code, GuestAddress(entry)).unwrap();
        let vcpu = self.vm.create_vcpu(u64::from(index)).unwrap();
        let mode = EntryMode::Pvh {
            entry,
            start_info: 0,
        };
        regs::setup_sregs(&self.mem, &vcpu, mode).unwrap();
        regs::setup_regs(&vcpu, mode).unwrap();
        vcpu
    }
}
