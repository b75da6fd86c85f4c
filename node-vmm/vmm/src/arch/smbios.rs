//! SMBIOS 3.0 tables (DMTF DSP0134 3.2): a 64-bit entry point at the start of
//! the BIOS area, BIOS information (type 0), system information (type 1)
//! and the end marker (type 127).
//!
//! Guests read them as DMI: `dmidecode`, `/sys/class/dmi/id/` (systemd's
//! `systemd-detect-virt` and cloud-init's `ds-identify` look at the vendor
//! and product names). Linux also scans the 64 KiB BIOS area for an entry
//! point, 16 bytes at a time, twice (64-bit, then 32-bit) when there is
//! none; on a software KVM that scan costs over a second of guest time. The
//! entry point at its first step ends it at once.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Where the entry point goes: the first address Linux's scan looks at.
pub const SMBIOS_START: u64 = layout::SMBIOS_START;
const SMBIOS_LIMIT: u64 = layout::HIMEM_START;

const ENTRY_POINT_LEN: usize = 0x18;
const TABLE_AT: u64 = SMBIOS_START + 0x20;
const VENDOR: &str = "kubevmm";
const PRODUCT: &str = "kubevmm virtual machine";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// BIOS characteristics: "not supported" (bit 3); extension byte 2: the
/// table describes a virtual machine (bit 4).
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// Wake-up type: power switch.
const WAKE_POWER_SWITCH: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    #[error("the SMBIOS tables need {0} bytes, more than the BIOS area holds")]
    TooBig(usize),
    #[error("cannot write the SMBIOS tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// One structure: header, formatted area, then its strings (numbered from
/// 1 in the formatted area), each NUL-terminated, and a final NUL.
fn structure(kind: u8, handle: u16, formatted: &[u8], strings: &[&str]) -> Vec<u8> {
    let mut s = vec![kind, (4 + formatted.len()) as u8];
    s.extend_from_slice(&handle.to_le_bytes());
    s.extend_from_slice(formatted);
    for text in strings {
        s.extend(text.bytes().filter(|b| *b != 0));
        s.push(0);
    }
    if strings.is_empty() {
        s.push(0);
    }
    s.push(0);
    s
}

fn bios_information() -> Vec<u8> {
    let mut f = vec![1, 2]; // vendor, version
    f.extend_from_slice(&0u16.to_le_bytes()); // no BIOS segment: no firmware
    f.extend_from_slice(&[3, 0]); // release date, ROM size
    f.extend_from_slice(&BIOS_CHARACTERISTICS_NOT_SUPPORTED.to_le_bytes());
    f.extend_from_slice(&[0, BIOS_EXT2_VIRTUAL_MACHINE]);
    f.extend_from_slice(&[0, 0, 0xff, 0xff]); // release 0.0, no embedded controller
    structure(0, 0, &f, &[VENDOR, VERSION, "01/01/2026"])
}

/// `uuid` in SMBIOS byte order: the first three fields little-endian.
fn system_information(uuid: &[u8; 16]) -> Vec<u8> {
    let mut f = vec![1, 2, 3, 0]; // manufacturer, product, version, no serial
    let mut u = *uuid;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    f.extend_from_slice(&u);
    f.extend_from_slice(&[WAKE_POWER_SWITCH, 0, 4]); // no SKU, family
    structure(1, 1, &f, &[VENDOR, PRODUCT, VERSION, VENDOR])
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The entry point and the structure table, as they go at `SMBIOS_START`.
/// `uuid` is the system UUID (RFC 4122 byte order); all zeros says "none".
pub fn build(uuid: &[u8; 16]) -> Result<Vec<u8>, SmbiosError> {
    let mut table = bios_information();
    table.extend(system_information(uuid));
    table.extend(structure(127, 2, &[], &[]));
    let total = (TABLE_AT - SMBIOS_START) as usize + table.len();
    if SMBIOS_START + total as u64 > SMBIOS_LIMIT {
        return Err(SmbiosError::TooBig(total));
    }
    let mut ep = Vec::with_capacity(ENTRY_POINT_LEN);
    ep.extend_from_slice(b"_SM3_");
    ep.extend_from_slice(&[0, ENTRY_POINT_LEN as u8, 3, 2, 0, 1, 0]);
    ep.extend_from_slice(&(table.len() as u32).to_le_bytes());
    ep.extend_from_slice(&TABLE_AT.to_le_bytes());
    ep[5] = checksum(&ep);

    let mut out = ep;
    out.resize((TABLE_AT - SMBIOS_START) as usize, 0);
    out.extend(table);
    Ok(out)
}

/// Writes the SMBIOS tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, uuid: &[u8; 16]) -> Result<(), SmbiosError> {
    mem.write_slice(&build(uuid)?, GuestAddress(SMBIOS_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [
        0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];

    /// Splits the structure table the way Linux's `dmi_decode_table` does:
    /// (type, formatted area, strings).
    fn parse(mut t: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        while !t.is_empty() {
            let (kind, len) = (t[0], usize::from(t[1]));
            let formatted = t[..len].to_vec();
            let mut rest = &t[len..];
            let mut strings = Vec::new();
            loop {
                let nul = rest.iter().position(|b| *b == 0).unwrap();
                if nul == 0 {
                    rest = &rest[1..];
                    if strings.is_empty() {
                        rest = &rest[1..];
                    }
                    break;
                }
                strings.push(String::from_utf8(rest[..nul].to_vec()).unwrap());
                rest = &rest[nul + 1..];
            }
            out.push((kind, formatted, strings));
            t = rest;
        }
        out
    }

    #[test]
    fn entry_point_checks_out_and_points_at_the_table() {
        let b = build(&UUID).unwrap();
        let ep = &b[..ENTRY_POINT_LEN];
        assert_eq!(&ep[..5], b"_SM3_");
        assert_eq!(ep.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(usize::from(ep[6]), ENTRY_POINT_LEN);
        let max = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
        let at = u64::from_le_bytes(ep[16..24].try_into().unwrap());
        assert_eq!(at, TABLE_AT);
        let table = &b[(at - SMBIOS_START) as usize..];
        assert_eq!(table.len(), max);
    }

    #[test]
    fn structures_parse_with_their_strings_and_end_with_type_127() {
        let b = build(&UUID).unwrap();
        let s = parse(&b[(TABLE_AT - SMBIOS_START) as usize..]);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, [0, 1, 127]);
        let (_, bios, strings) = &s[0];
        assert_eq!(bios.len(), 0x18);
        assert_eq!(strings[usize::from(bios[4]) - 1], VENDOR);
        assert_eq!(
            bios[0x13] & BIOS_EXT2_VIRTUAL_MACHINE,
            BIOS_EXT2_VIRTUAL_MACHINE
        );
        let (_, sys, strings) = &s[1];
        assert_eq!(sys.len(), 0x1b);
        assert_eq!(strings[usize::from(sys[4]) - 1], VENDOR);
        assert_eq!(strings[usize::from(sys[5]) - 1], PRODUCT);
        assert_eq!(sys[7], 0, "no serial number string");
        // dmidecode prints the UUID's first three fields byte-swapped back.
        assert_eq!(&sys[8..12], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(&sys[12..14], &[0xbc, 0x9a]);
        assert_eq!(&sys[14..16], &[0xf0, 0xde]);
        assert_eq!(&sys[16..24], &UUID[8..]);
        let handles: Vec<u16> = s
            .iter()
            .map(|x| u16::from_le_bytes([x.1[2], x.1[3]]))
            .collect();
        assert_eq!(handles, [0, 1, 2]);
    }
}
