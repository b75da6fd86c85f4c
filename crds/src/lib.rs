//! kubevmm API types.
