//! Tap devices on host bridges: their stable names and MACs (pure),
//! creating and removing them ([`super::netlink`]).

use super::prepare::{PrepareError, Tap};

/// A stable locally administered MAC for a VM's interface (52:54:00 prefix).
pub fn stable_mac(uid: &str, network: &str) -> String {
    let h = uid
        .bytes()
        .chain([0])
        .chain(network.bytes())
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

/// Tap name for interface `index` of the VM with `uid` (unique per node, ≤ 15 bytes).
pub fn tap_name(uid: &str, index: usize) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    format!("kvt{short}n{index}")
}

/// Creates each tap (replacing a stale one) on its bridge and brings it up.
pub fn create(taps: &[Tap]) -> Result<(), PrepareError> {
    for t in taps {
        super::netlink::create_tap(&t.name, &t.bridge).map_err(|e| PrepareError::Host {
            what: format!("tap {} on bridge {}", t.name, t.bridge),
            why: e.to_string(),
        })?;
    }
    Ok(())
}

/// Most NICs a VM may have (the VMM's virtio device limit): the orphan
/// sweep, which no longer knows the spec, releases this many tap names.
pub const MAX_TAPS: usize = kubevmm_vmm::arch::layout::VIRTIO_MAX_DEVICES;

/// Removes the taps of a plan (best effort; used when the VM goes away).
pub fn release_taps(uid: &str, count: usize) {
    for i in 0..count.min(MAX_TAPS) {
        if let Err(e) = super::netlink::delete_link(&tap_name(uid, i)) {
            tracing::warn!(uid, "cannot remove a tap: {e}");
        }
    }
}
