//! kubevmm's API (`kubevmm.io/v1alpha1`): `VirtualMachine`, `HypervisorNode`
//! and `VirtualMachineImage`, their CRDs, and client-side validation with
//! the same rules the API server enforces.

pub mod contract;
pub mod crd;
pub mod events;
pub mod image;
pub mod node;
pub mod printable;
pub mod quantity;
pub mod validation;
pub mod vm;

pub use image::{VirtualMachineImage, VirtualMachineImageSpec, VirtualMachineImageStatus};
pub use node::{HypervisorNode, HypervisorNodeSpec, HypervisorNodeStatus};
pub use printable::PrintableStatus;
pub use vm::{RunStrategy, VirtualMachine, VirtualMachineSpec, VirtualMachineStatus, VmPhase};

/// The API group.
pub const GROUP: &str = "kubevmm.io";
/// The API version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every kind in the group.
pub const API_VERSION: &str = "kubevmm.io/v1alpha1";

#[cfg(test)]
mod tests {
    #[test]
    fn api_version_is_group_and_version() {
        assert_eq!(
            super::API_VERSION,
            format!("{}/{}", super::GROUP, super::VERSION)
        );
    }
}
