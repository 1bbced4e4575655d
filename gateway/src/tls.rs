//! TLS termination for the HTTPS listener: the certificate is chosen by SNI
//! among the `tls` files of the served HTTP routes and reloaded from disk when
//! a new snapshot arrives. It owns certificate selection only; HTTP is
//! [`crate::http`]'s. The crypto provider is always ring, named explicitly.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use ployz_routing::{Snapshot, SnapshotReceiver, TlsFiles};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
};
use tracing::{debug, warn};

/// Why TLS could not be set up or a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the TLS server configuration is invalid")]
    Config {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot read certificates from `{path}`")]
    ReadCertificate {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("`{path}` holds no certificate")]
    NoCertificate { path: String },
    #[error("cannot read a private key from `{path}`")]
    ReadKey {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate `{certificate}` and key `{key}` are not a usable pair")]
    Pair {
        certificate: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
}

/// Terminates TLS with the certificate of the route whose host the client
/// names in SNI. Clients without SNI or naming an unknown host fail the
/// handshake: there is no default certificate.
///
/// Like the proxy, it follows the snapshot receiver by itself: the first
/// handshake after a snapshot change reloads every certificate file.
pub struct TlsTerminator {
    resolver: Arc<CertResolver>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for TlsTerminator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTerminator")
            .field("hosts", &self.hosts())
            .finish_non_exhaustive()
    }
}

impl TlsTerminator {
    /// A terminator serving the certificates of what `snapshots` holds.
    pub fn new(snapshots: SnapshotReceiver) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = Arc::new(CertResolver::new(snapshots, Arc::clone(&provider)));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Config { source })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(Self {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }))
    }

    /// The acceptor that runs handshakes with this terminator's certificates.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The host names a certificate is served for, sorted.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.resolver.current().hosts.keys().cloned().collect();
        hosts.sort_unstable();
        hosts
    }
}

/// The certificates of one snapshot, by host.
struct CertState {
    snapshot: Arc<Snapshot>,
    hosts: HashMap<String, Arc<CertifiedKey>>,
}

struct CertResolver {
    snapshots: SnapshotReceiver,
    provider: Arc<CryptoProvider>,
    state: RwLock<Arc<CertState>>,
    /// The last key loaded for each file set, kept while loading it again
    /// fails; its lock also serializes reloads.
    loaded: Mutex<HashMap<TlsFiles, Arc<CertifiedKey>>>,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl CertResolver {
    fn new(snapshots: SnapshotReceiver, provider: Arc<CryptoProvider>) -> Self {
        let empty = Arc::new(CertState {
            snapshot: Arc::new(Snapshot::default()),
            hosts: HashMap::new(),
        });
        let resolver = Self {
            snapshots,
            provider,
            state: RwLock::new(empty),
            loaded: Mutex::new(HashMap::new()),
        };
        resolver.current();
        resolver
    }

    /// The certificates of the receiver's current snapshot, loaded on change.
    fn current(&self) -> Arc<CertState> {
        let state = Arc::clone(&self.state.read().unwrap_or_else(PoisonError::into_inner));
        if Arc::ptr_eq(&state.snapshot, &*self.snapshots.borrow()) {
            return state;
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let latest = Arc::clone(&*self.snapshots.borrow());
        let state = Arc::clone(&self.state.read().unwrap_or_else(PoisonError::into_inner));
        if Arc::ptr_eq(&state.snapshot, &latest) {
            return state;
        }
        let state = Arc::new(self.load(latest, &mut loaded));
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&state);
        state
    }

    /// Reads every route's certificate files. A file set that fails keeps its
    /// last good key if there is one, and is skipped otherwise; namespaces
    /// come in name order, so the first to name a host keeps it.
    fn load(
        &self,
        snapshot: Arc<Snapshot>,
        loaded: &mut HashMap<TlsFiles, Arc<CertifiedKey>>,
    ) -> CertState {
        let mut fresh: HashMap<TlsFiles, Option<Arc<CertifiedKey>>> = HashMap::new();
        let mut hosts = HashMap::new();
        for (namespace, route) in snapshot.table.http_routes() {
            let Some(files) = &route.tls else { continue };
            let key = fresh
                .entry(files.clone())
                .or_insert_with(|| match load_files(files, &self.provider) {
                    Ok(key) => Some(Arc::new(key)),
                    Err(error) => {
                        warn!(
                            namespace,
                            service = %route.service,
                            error = %ployz_routing::error_chain(&error),
                            "cannot load a route's certificate"
                        );
                        loaded.get(files).cloned()
                    }
                })
                .clone();
            let Some(key) = key else { continue };
            for host in &route.hosts {
                hosts
                    .entry(ployz_routing::table::normalize_host(host))
                    .or_insert_with(|| Arc::clone(&key));
            }
        }
        *loaded = fresh
            .into_iter()
            .filter_map(|(files, key)| Some((files, key?)))
            .collect();
        CertState { snapshot, hosts }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = client_hello.server_name() else {
            debug!("TLS client sent no SNI; refusing the handshake");
            return None;
        };
        let name = ployz_routing::table::normalize_host(name);
        let state = self.current();
        let found = state.hosts.get(&name).or_else(|| {
            let (_, parent) = name.split_once('.')?;
            state.hosts.get(&format!("*.{parent}"))
        });
        if found.is_none() {
            debug!(sni = %name, "no certificate for the TLS client's SNI; refusing the handshake");
        }
        found.cloned()
    }
}

fn load_files(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(&files.certificate)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificate {
            path: files.certificate.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.certificate.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadKey {
        path: files.key.clone(),
        source,
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Pair {
        certificate: files.certificate.clone(),
        key: files.key.clone(),
        source,
    })
}
