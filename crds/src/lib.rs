//! kubevmm's API (`kubevmm.io/v1alpha1`): `VirtualMachine`, `HypervisorNode`
//! and `VirtualMachineImage`, their CRDs, and client-side validation with
//! the same rules the API server enforces.

pub mod contract;
pub mod crd;
pub mod image;
pub mod node;
pub mod quantity;
pub mod validation;
pub mod vm;

pub use image::{VirtualMachineImage, VirtualMachineImageSpec, VirtualMachineImageStatus};
pub use node::{HypervisorNode, HypervisorNodeSpec, HypervisorNodeStatus};
pub use vm::{RunStrategy, VirtualMachine, VirtualMachineSpec, VirtualMachineStatus, VmPhase};

/// The API group.
pub const GROUP: &str = "kubevmm.io";
/// The API version.
pub const VERSION: &str = "v1alpha1";
