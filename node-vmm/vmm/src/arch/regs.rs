//! Boot-time vCPU state: general registers, segments, page tables, FPU, MSRs
//! and local APIC wiring.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM refused vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {0} of the boot MSRs")]
    Msrs(usize),
    #[error("cannot write boot page tables or GDT to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// How the bootstrap processor enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode with identity page tables, `%rsi` = `boot_params`
    /// (vmlinux without PVH note, bzImage).
    Long { entry: u64, boot_params: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT entry from flags, base and limit (Intel SDM vol. 3 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let get = |shift: u32, bits: u32| ((entry >> shift) & ((1 << bits) - 1)) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = get(55, 1);
    kvm_segment {
        base,
        // KVM wants the byte-granular limit.
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: get(40, 4),
        present: get(47, 1),
        dpl: get(45, 2),
        db: get(54, 1),
        s: get(44, 1),
        l: get(53, 1),
        g,
        avl: get(52, 1),
        padding: 0,
        unusable: u8::from(get(47, 1) == 0),
    }
}

/// Writes the GDT and loads segments and control registers for `mode`.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let long = matches!(mode, EntryMode::Long { .. });
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code
    } else {
        gdt_entry(0xc09b, 0, 0xfffff) // 32-bit code
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START + i as u64 * 8))?;
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    if long {
        setup_page_tables(mem)?;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

/// Identity-maps the first 1 GiB with 2 MiB pages for a 64-bit entry.
fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(layout::PDPTE_START | 0x3, GuestAddress(layout::PML4_START))?;
    mem.write_obj(layout::PDE_START | 0x3, GuestAddress(layout::PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PDE_START + i * 8))?;
    }
    Ok(())
}

/// General registers for the bootstrap processor.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryMode::Long { entry, boot_params } => {
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm("general registers"))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Boot MSRs: syscall MSRs cleared, fast strings on, MTRRs default write-back.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs(0))?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if written != entries.len() {
        return Err(RegsError::Msrs(written));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Wires LINT0 to the PIC (`ExtINT`) and LINT1 to NMI, as firmware would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = u32::from_le_bytes(bytes);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as std::os::raw::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db, code64.g), (1, 0, 1));
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!(code64.selector, 8);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.type_), (0, 1, 0xb));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.present, data.s), (3, 1, 1));
    }
}
