//! peermesh: peer-to-peer groups for games and apps.
pub mod protocol;
