//! machine: machine identity and cluster membership. A machine's identity (its
//! id, its network, its cluster) is kept on its own disk so the daemon can find
//! its store after a restart; membership facts (`network`, `machines.<id>`) are
//! kept in the store. Founding a network (`mesh init`) lives here: it creates
//! both. Depends on the store contract, never on a backend.

pub mod founding;
pub mod identity;
pub mod records;

pub use founding::{FoundingError, FoundingPlan, plan_founding};
pub use identity::{IdentityError, LocalIdentity, NetworkName};
pub use records::{MachineRecord, Membership, NetworkRecord};
