//! Normalized CPUID: what KVM supports, with per-vCPU topology filled in.

use kvm_bindings::CpuId;

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX
const TSC_DEADLINE_BIT: u32 = 1 << 24; // leaf 1 ECX

/// Adjusts KVM's supported CPUID for vCPU `cpu_index` of `cpu_count`.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (u32::from(cpu_index) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                entry.ecx |= HYPERVISOR_BIT | TSC_DEADLINE_BIT;
                if cpu_count > 1 {
                    entry.edx |= HTT_BIT;
                } else {
                    entry.edx &= !HTT_BIT;
                }
            }
            0x4 => {
                // Cores per package (minus one) in EAX[31:26]; one thread per core.
                entry.eax = (entry.eax & 0x03ff_ffff) | (u32::from(cpu_count - 1) << 26);
                entry.eax &= !(0xfff << 14);
            }
            0x6 => {
                // No power management features (EPB, HWP) are emulated.
                entry.ecx &= !(1 << 3);
            }
            0xa => {
                // No PMU: guests must not program performance counters.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: SMT level (1 thread), then core level.
                entry.edx = u32::from(cpu_index);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = 32 - u32::from(cpu_count).leading_zeros();
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }])
        .unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(e.edx & HTT_BIT, 0);
    }
}
