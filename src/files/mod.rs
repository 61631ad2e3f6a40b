//! File transfer between members (`docs/PROTOCOL.md` §8.9, in progress: issue 15). The wire
//! messages, the receiver's file names and its partial files are here; the transfers are not
//! wired into the client yet.

pub(crate) mod name;
pub(crate) mod part;
pub(crate) mod wire;
