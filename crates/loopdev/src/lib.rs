//! Linux loop devices over the loop(4) ioctls: `LoopControl` allocates, `Loop` configures and inspects.
//! Knows nothing about N-API; the binding crate converts these types for JavaScript.

pub mod attach;
pub mod control;
pub mod device;
pub mod error;
pub mod info;
mod inode;
pub mod ioctl;
pub mod node;
pub mod openers;
pub mod partition;
pub mod remote;
pub mod uapi;

pub use attach::{Applied, AttachOptions, Attached};
pub use control::LoopControl;
pub use device::{ConfigureOptions, Loop, StatusChange};
pub use error::{Error, Kind, Result};
pub use info::LoopInfo;
pub use node::{remove_node, Node};
