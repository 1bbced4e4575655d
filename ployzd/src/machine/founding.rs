//! Founding a network on this machine (`ployzctl mesh init <network>`).
//!
//! The decision is a pure function of the local identity and the request
//! ([`plan_founding`]); the store half ([`ensure_membership_records`]) is
//! create-if-absent, so a founding interrupted at any step finishes on retry.

use super::{
    identity::{LocalIdentity, NetworkName},
    records::{MachineMesh, MachineRecord, Membership, NetworkRecord},
};
use crate::store::{RecordStore, StoreError, encode};

/// What `mesh init` must do on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FoundingPlan {
    /// No identity yet: create one for the requested network.
    Found,
    /// This machine already belongs to the requested network: make sure its
    /// records exist (they do unless an earlier attempt was interrupted).
    Resume(LocalIdentity),
}

/// Decides what founding `requested` means given this machine's identity.
pub fn plan_founding(
    local: Option<&LocalIdentity>,
    requested: &NetworkName,
) -> Result<FoundingPlan, FoundingError> {
    match local {
        None => Ok(FoundingPlan::Found),
        Some(identity) if &identity.network == requested => {
            Ok(FoundingPlan::Resume(identity.clone()))
        }
        Some(identity) => Err(FoundingError::NetworkMismatch {
            current: identity.network.to_string(),
            requested: requested.to_string(),
        }),
    }
}

/// Which membership records a founding had to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordsWritten {
    pub network: bool,
    pub machine: bool,
}

impl RecordsWritten {
    pub fn any(self) -> bool {
        self.network || self.machine
    }
}

/// Writes the network and machine records if absent, and checks that records
/// already present agree with `identity`.
pub async fn ensure_membership_records<S: RecordStore>(
    store: &S,
    identity: &LocalIdentity,
    hostname: &str,
    mesh: Option<MachineMesh>,
    now_unix_ms: u64,
) -> Result<RecordsWritten, FoundingError> {
    let network = NetworkRecord {
        network: identity.network.clone(),
        cluster_id: identity.cluster_id.clone(),
        founded_by: identity.machine_id.clone(),
        created_at_unix_ms: now_unix_ms,
        overlay_prefix: identity.mesh.as_ref().map(|mesh| mesh.prefix),
    };
    let network_written = create_or_check(
        store,
        &NetworkRecord::key(),
        &network,
        |found: &NetworkRecord| {
            found.network == network.network && found.cluster_id == network.cluster_id
        },
    )
    .await?;

    let machine = MachineRecord {
        id: identity.machine_id.clone(),
        hostname: hostname.to_owned(),
        network: identity.network.clone(),
        membership: Membership::Active,
        joined_at_unix_ms: now_unix_ms,
        mesh,
        store_role: crate::machine::records::StoreRole::Core,
        route_certificate: None,
    };
    let machine_written = create_or_check(
        store,
        &MachineRecord::key(&identity.machine_id),
        &machine,
        |found: &MachineRecord| found.id == machine.id && found.network == machine.network,
    )
    .await?;

    Ok(RecordsWritten {
        network: network_written,
        machine: machine_written,
    })
}

async fn create_or_check<S, T>(
    store: &S,
    key: &crate::store::Key,
    value: &T,
    agrees: impl Fn(&T) -> bool,
) -> Result<bool, FoundingError>
where
    S: RecordStore,
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    match store.create(key, encode(key, value)?).await {
        Ok(_) => Ok(true),
        Err(StoreError::AlreadyExists { .. }) => {
            let found = store
                .get(key)
                .await?
                .ok_or_else(|| FoundingError::RecordVanished {
                    key: key.to_string(),
                })?;
            if agrees(&found.decode()?) {
                Ok(false)
            } else {
                Err(FoundingError::StoreDisagrees {
                    key: key.to_string(),
                })
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// Why founding a network failed.
#[derive(Debug, thiserror::Error)]
pub enum FoundingError {
    #[error(
        "this machine already belongs to network `{current}`, not `{requested}`; \
         run `ployzctl mesh init {current}` or use another machine"
    )]
    NetworkMismatch { current: String, requested: String },
    #[error("store record `{key}` describes another cluster than this machine's identity")]
    StoreDisagrees { key: String },
    #[error("store record `{key}` was deleted while founding; retry")]
    RecordVanished { key: String },
    #[error("membership records")]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn net(name: &str) -> NetworkName {
        NetworkName::parse(name).expect("valid")
    }

    #[test]
    fn a_machine_without_identity_founds() {
        assert_eq!(
            plan_founding(None, &net("prod")).expect("plan"),
            FoundingPlan::Found
        );
    }

    #[test]
    fn the_same_network_resumes_and_another_is_refused() {
        let identity = LocalIdentity::generate(net("prod"), 1);
        assert_eq!(
            plan_founding(Some(&identity), &net("prod")).expect("plan"),
            FoundingPlan::Resume(identity.clone())
        );
        let error = plan_founding(Some(&identity), &net("staging")).expect_err("mismatch");
        assert!(matches!(error, FoundingError::NetworkMismatch { .. }));
    }

    #[tokio::test]
    async fn records_are_written_once_then_left_alone() {
        let store = MemoryStore::new();
        let identity = LocalIdentity::generate(net("prod"), 1);
        let first = ensure_membership_records(&store, &identity, "host-a", None, 10)
            .await
            .expect("first");
        assert_eq!(
            first,
            RecordsWritten {
                network: true,
                machine: true
            }
        );
        let second = ensure_membership_records(&store, &identity, "host-a", None, 20)
            .await
            .expect("second");
        assert!(!second.any());
        let machine: MachineRecord = store
            .get(&MachineRecord::key(&identity.machine_id))
            .await
            .expect("get")
            .expect("present")
            .decode()
            .expect("decode");
        assert_eq!(
            machine.joined_at_unix_ms, 10,
            "a retry must not rewrite the record"
        );
    }

    #[tokio::test]
    async fn a_store_of_another_cluster_is_refused() {
        let store = MemoryStore::new();
        let ours = LocalIdentity::generate(net("prod"), 1);
        let theirs = LocalIdentity::generate(net("prod"), 1);
        ensure_membership_records(&store, &theirs, "host-b", None, 1)
            .await
            .expect("theirs");
        let error = ensure_membership_records(&store, &ours, "host-a", None, 2)
            .await
            .expect_err("disagrees");
        assert!(matches!(error, FoundingError::StoreDisagrees { .. }));
    }
}
