//! Access plumbing shared by the operator (which serves the subresource API
//! `subresources.kubevmm.io` and relays to nodes) and node-vmm (which serves
//! the console, logs and port-forward streams of its VMs): the mutual-TLS
//! set-up both sides use, and the node stream protocol between them.
//! DESIGN.md, "Access"; docs/access.md.

pub mod node_api;
pub mod tls;
