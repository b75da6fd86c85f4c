//! kubevmm VMM.
