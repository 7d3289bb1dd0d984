//! Image streams: the model (streams, tags, generations), name and reference grammar,
//! resolution of references through stream tags (the CRI path's only dependency here), and the
//! service that changes streams.

pub mod events;
pub mod model;
pub mod names;
pub mod reference;
pub mod resolve;
pub mod service;
