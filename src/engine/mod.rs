//! The engine behind the hub and the workers: a [`Store`] of projects and sync records,
//! a [`JobQueue`] that carries sync jobs to workers, and an [`EventLog`] that numbers each
//! user's events, keeps their history and fans them out live (`traits.rs`), what they
//! hold (`model.rs`), and the [`Engine`] that bundles them (`service.rs`). `embedded`
//! implements all three in process for a single node; `redis` implements them on Redis
//! for any number of hub and worker processes, side by side file for file.

pub mod embedded;
mod error;
pub mod fair;
mod model;
pub mod redis;
pub mod schedule;
mod service;
mod traits;

pub use error::EngineError;
pub use model::{
    Claimed, History, Lease, Live, MAX_DELIVERIES, Project, ProjectChange, ProjectLock, Put,
    WebhookKey, next_fence,
};
pub use service::Engine;
pub(crate) use service::{put_back, remove_files};
pub use traits::{EventLog, JobQueue, ONCE_KEPT, ONCE_KEPT_END, Store, once_kept};
