//! The worker's gRPC service and server, end to end over TCP: simulated workers for behaviour
//! (streams, errors, cancellation, abort, health, reflection, registration) and the default
//! model for agreement with the engine used directly.

mod model;
mod registration;
mod sim_worker;
mod support;
