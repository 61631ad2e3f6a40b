//! File transfer between members (`docs/PROTOCOL.md` §8.9, in progress: issue 15). The wire
//! messages and the receiver's file names are here; the transfers are not wired in yet.

pub(crate) mod name;
pub(crate) mod wire;
