//! The functions `thaw serve` knows: each name's serving version (or why it cannot serve), and
//! the operations that change them. A deploy validates the upload, snapshots it (cold boot,
//! init, checkpoint, working set) unless the store already holds that version's image, starts
//! the new version serving, commits it to the store, and only then switches traffic to it.
//! Requests that already took the old version finish on it. Snapshots run side by side; what
//! follows them, and deletes, run one at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use abi::devices::DeviceKind;
use host_vmm::function::{self, Function};
use host_vmm::virtio::vsock::Services;
use host_vmm::{Image, VmConfig};
use serde::Serialize;
use tracing::{error, info, warn};

use super::deployed::{Deployed, DeployedError, Retired};
use super::metrics::{self, FunctionMetrics};
use super::puller::Puller;
use super::settings::{self, Serving};
use super::store::{Record, Store, StoreError};
use crate::files::FilesError;
use crate::pack::Language;
use crate::snapshot::SnapshotError;

/// Why a deploy or a delete failed, or a function cannot serve. `api.rs` gives each its HTTP
/// status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The serving settings are not acceptable (400).
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// The uploaded bundle is not acceptable (400).
    #[error(transparent)]
    Bundle(crate::code::CodeError),
    /// The uploaded wasm module is not acceptable (400).
    #[error("the wasm module: {0}")]
    Wasm(crate::pack::PackError),
    /// The uploaded JavaScript module could not be packed (400).
    #[error("the JavaScript module: {0}")]
    JavaScript(crate::pack::PackError),
    /// The uploaded Python module could not be packed (400).
    #[error("the Python module: {0}")]
    Python(crate::pack::PackError),
    /// This server has no CPython for WASI to pack a Python module with (501).
    #[error("this server cannot pack Python: {0}")]
    NoPython(crate::python::PyError),
    /// The upload is neither a bundle nor a wasm module, and not said to be source (400).
    #[error(
        "the body is neither a thaw bundle (.thaw) nor a wasm module (.wasm): it starts with [{0}] (a JavaScript module is sent with Content-Type: text/javascript, a Python module with text/x-python)"
    )]
    NotFunction(String),
    /// The bundle is not a valid function (400).
    #[error(transparent)]
    Function(#[from] host_vmm::function::FunctionError),
    /// The function connects to a service this server does not offer (400).
    #[error(
        "the function connects to service {name:?} (port {port}), which this server does not offer (it offers: {offered}); start thaw serve with --service {name}=SOCKET"
    )]
    Service {
        /// The service's name.
        name: String,
        /// Its vsock port.
        port: u32,
        /// The services the server offers, or "none".
        offered: String,
    },
    /// The function could not be booted, initialized or snapshotted (422).
    #[error("{name}: {why}")]
    Unusable {
        /// The function's name.
        name: String,
        /// Why, without the scratch directory's path.
        why: String,
    },
    /// The node ran out of disk space, or of its quota, making the function's image (507).
    #[error("{name}: the server's disk is full: {why}")]
    NoSpace {
        /// The function's name.
        name: String,
        /// What could not be written, without the scratch directory's path.
        why: String,
    },
    /// No such function (404).
    #[error("no function {0:?} is deployed")]
    NotFound(String),
    /// A deploy by reference names no bundle, or one the registry would not give (400).
    #[error("{0}")]
    Reference(crate::serve::puller::PullerError),
    /// A deploy by reference names a snapshot image (400).
    #[error(
        "{0} is a snapshot image: thaw serve deploys bundles by reference (it runs only code it compiled itself, which an image's memory cannot show), and snapshots them itself"
    )]
    ImageByReference(String),
    /// A version to serve from its stored image has none (a deploy by reference then pulls the
    /// bundle after all; never shown).
    #[error("the image of that version is not stored")]
    NotStored,
    /// The registry puller is not running (503).
    #[error("this server cannot deploy by reference: {0}")]
    NoPuller(crate::serve::puller::PullerError),
    /// The peer fetcher is not running (503).
    #[error("this server cannot deploy from a peer: {0}")]
    NoFetcher(super::fetcher::FetcherError),
    /// The peer's address is not an image's, or its head was refused (400), or could not be
    /// read (502).
    #[error(transparent)]
    Peer(#[from] crate::remote::PeerError),
    /// The store failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store's scratch space refused a directory (500).
    #[error("{}: {source}", path.display())]
    Scratch {
        /// The scratch space.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Work on the blocking pool panicked or was cancelled (500).
    #[error("{0}")]
    Blocking(tokio::task::JoinError),
    /// The stored image could not be opened (500).
    #[error(transparent)]
    Image(#[from] host_vmm::snapshot::SnapshotError),
    /// The version could not start serving (500).
    #[error(transparent)]
    Start(#[from] DeployedError),
}

/// What a deploy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Deployment {
    /// The name is new.
    Created,
    /// The name serves a new version, or new settings.
    Updated,
    /// The same content with the same settings: nothing changed.
    Unchanged,
}

/// A function as the API shows it.
#[derive(Debug, Serialize)]
pub struct View {
    /// Its name.
    pub name: String,
    /// Its version: the SHA-256 of its bundle (and of its extra devices, if it has any).
    pub version: String,
    /// "serving", or "failed: why" for one that could not be started.
    pub state: String,
    /// How it is served.
    pub settings: Serving,
    /// When this version was deployed, in seconds since the Unix epoch.
    pub deployed_at: u64,
    /// VMs alive for it now.
    pub live_vms: u64,
    /// What the function has done since this server started (or it was first deployed).
    pub counters: Arc<FunctionMetrics>,
}

/// A function: its record, its metrics (shared by its versions), and its serving version or
/// why it has none.
struct Slot {
    record: Record,
    metrics: Arc<FunctionMetrics>,
    serving: Result<Arc<Deployed>, Arc<RegistryError>>,
}

/// The deployed functions.
pub struct Registry {
    store: Store,
    slots: RwLock<HashMap<String, Slot>>,
    changing: tokio::sync::Mutex<()>,
    operator: Operator,
    retired: Retired,
}

/// What the operator set for every function on this server.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    /// The serving settings a deploy does not give.
    pub defaults: Serving,
    /// The host sockets functions may connect to, by name (`thaw serve --service`).
    pub services: BTreeMap<String, PathBuf>,
    /// How long a vCPU thread polls for its next request before it sleeps (`--poll-us`).
    pub poll: Duration,
    /// The registry puller deploys by reference ask, or why there is none.
    pub puller: Option<Arc<Puller>>,
    /// The peer fetcher deploys from a peer ask (`fetcher.rs`).
    pub fetcher: Option<Arc<super::fetcher::Fetcher>>,
}

/// True for a function name: 1 to 64 of `[A-Za-z0-9._-]`, but not `.` or `..`, which clients
/// resolve away before they send a URL.
pub fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name != "."
        && name != ".."
}

impl Registry {
    /// Starts every function the store holds, each from its stored image (no snapshot is
    /// taken). One that cannot start is kept as failed, with why, until it is deployed again.
    pub fn load(store: Store, operator: Operator) -> Result<Self, RegistryError> {
        let retired = Retired::default();
        let mut slots = HashMap::new();
        for record in store.records()? {
            let metrics = Arc::<FunctionMetrics>::default();
            let serving = resolve(&operator.services, &record.serving).and_then(|services| {
                let image = Image::open(&store.image_path(&record.version))?;
                Ok(Deployed::start(
                    &record.version,
                    &record.serving,
                    Arc::new(image),
                    services,
                    operator.poll,
                    Arc::clone(&metrics),
                    Arc::clone(&retired),
                )?)
            });
            match &serving {
                Ok(_) => {
                    info!(function = record.name, version = short(&record.version), "serving from its stored image")
                }
                Err(error) => error!(function = record.name, %error, "cannot serve"),
            }
            let serving = serving.map(Arc::new).map_err(Arc::new);
            slots.insert(record.name.clone(), Slot { record, metrics, serving });
        }
        let removed = store.collect_garbage()?;
        if !removed.is_empty() {
            info!(files = removed.len(), "removed unreferenced files from the image store");
        }
        let changing = tokio::sync::Mutex::new(());
        Ok(Self { store, slots: RwLock::new(slots), changing, operator, retired })
    }

    /// The vCPU threads of every version that stopped serving, to join.
    pub fn retired(&self) -> Retired {
        Arc::clone(&self.retired)
    }

    /// Stops every version (each finishes what is queued on its own threads).
    pub fn stop_all(&self) {
        self.slots.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The serving version of `name`: `Ok(None)` if none is deployed, `Err` with why if it failed.
    pub fn serving(&self, name: &str) -> Result<Option<Arc<Deployed>>, Arc<RegistryError>> {
        match self.slots.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            None => Ok(None),
            Some(slot) => slot.serving.clone().map(Some),
        }
    }

    /// The image of `version` if a function serving here holds it, stored here: what a peer
    /// restores from. An image still arriving from a peer is not one (its holes are not all
    /// zero pages).
    pub fn held_image(&self, version: &str) -> Option<Arc<host_vmm::snapshot::Image>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.values().filter(|slot| slot.record.version == version).find_map(|slot| {
            let deployed = slot.serving.as_ref().ok().filter(|d| !d.image().is_remote())?;
            Some(Arc::clone(deployed.image()))
        })
    }

    /// `name` as the API shows it.
    pub fn view(&self, name: &str) -> Option<View> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).get(name).map(|slot| self.shown(slot))
    }

    /// Every function, by name.
    pub fn views(&self) -> Vec<View> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut views: Vec<View> = slots.values().map(|slot| self.shown(slot)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// The last `count` lines `name` and its guest wrote, or `None` if it is not deployed.
    pub fn logs(&self, name: &str, count: usize) -> Option<Vec<super::logs::Line>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).get(name).map(|slot| slot.metrics.logs.last(count))
    }

    /// Every function's metrics as Prometheus text.
    pub fn metrics(&self) -> String {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&String> = slots.keys().collect();
        names.sort();
        let samples: Vec<metrics::Sample<'_>> = names
            .into_iter()
            .map(|name| {
                let slot = &slots[name];
                let pool = slot.serving.as_ref().ok().and_then(|d| d.pool_stats());
                metrics::Sample { name, metrics: &slot.metrics, pool }
            })
            .collect();
        metrics::render(&samples)
    }

    /// Deploys `upload` (a bundle or a bare wasm, or a module of the source `language` the
    /// upload's type says) as `name` with the settings in `query`.
    pub async fn deploy(
        &self,
        name: &str,
        upload: Vec<u8>,
        language: Language,
        query: &str,
    ) -> Result<(Deployment, View), RegistryError> {
        let (mut serving, packing) = settings::parse(query, &self.operator.defaults)?;
        // The code is this agent's, compiled from the wasm or found in its code cache, never
        // taken from the upload (the bundle rule, `code.rs`); off the async workers, since
        // compiling is the slow part of a deploy after the snapshot.
        let cache = self.store.code_cache();
        let function = if upload.starts_with(&abi::bundle::MAGIC) {
            if let Some(given) = packing.first_given() {
                return Err(settings::SettingsError::InBundle(given.into()).into());
            }
            blocking(move || crate::code::own(upload, &cache)).await?.map_err(RegistryError::Bundle)?
        } else if upload.starts_with(b"\0asm") {
            let settings = packing.bundle_settings(name);
            let packed = blocking(move || crate::pack::bundle_wasm(&settings, &upload, &[], &cache)).await?;
            Function::from_bundle(packed.map_err(RegistryError::Wasm)?.bundle)?
        } else if language == Language::JavaScript {
            let mut settings = packing.bundle_settings(name);
            settings.memory_mib = packing.memory_mib.unwrap_or(crate::js::DEFAULT_MEMORY_MIB);
            let packed = blocking(move || crate::pack::javascript_module(upload, settings, &cache)).await?;
            Function::from_bundle(packed.map_err(RegistryError::JavaScript)?)?
        } else if language == Language::Python {
            let mut settings = packing.bundle_settings(name);
            settings.memory_mib = packing.memory_mib.unwrap_or(crate::python::DEFAULT_MEMORY_MIB);
            let packed = blocking(move || crate::pack::python_module(upload, settings, &cache)).await?;
            Function::from_bundle(packed.map_err(|e| match e {
                crate::pack::PackError::Python(
                    e @ (crate::python::PyError::NoRuntime(_) | crate::python::PyError::IncompleteRuntime { .. }),
                ) => RegistryError::NoPython(e),
                e => RegistryError::Python(e),
            })?)?
        } else {
            let head: Vec<String> = upload.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(RegistryError::NotFunction(head.join(" ")));
        };
        serving.services = function.manifest.connections.iter().map(|c| (c.port, c.name.clone())).collect();
        let version = version(&function.bundle, &serving.devices);
        self.put(name, version, serving, Some(Arc::new(function))).await
    }

    /// Makes `version` `name`'s, served with `serving`: from its stored image, or, when that is
    /// not stored, from an image of `function` snapshotted now. Without `function`, a version
    /// whose image is not stored is [`RegistryError::NotStored`].
    async fn put(
        &self,
        name: &str,
        version: String,
        serving: Serving,
        function: Option<Arc<Function>>,
    ) -> Result<(Deployment, View), RegistryError> {
        let services = resolve(&self.operator.services, &serving)?;
        let image_path = self.store.image_path(&version);
        // Unchanged only while its image is whole, where it is stored and under its VMs: a
        // damaged one is snapshotted again, and the version restarted from the new image.
        let unchanged = |slots: &HashMap<String, Slot>| {
            slots
                .get(name)
                .filter(|slot| {
                    slot.serving.as_ref().is_ok_and(|d| {
                        d.version == version && d.serving == serving && d.image_intact() && usable(&image_path)
                    })
                })
                .map(view)
        };
        if let Some(shown) = unchanged(&self.slots.read().unwrap_or_else(|p| p.into_inner())) {
            return Ok((Deployment::Unchanged, shown));
        }
        // The snapshot, the slow part, runs before the lock, so one function's long init does
        // not hold up another's deploy; it works in a directory of its own in tmp/. An image
        // that was stored already may be collected before the lock is taken (its last function
        // deleted meanwhile); then the function is snapshotted after all. Under the lock,
        // nothing collects it.
        let mut made = None;
        let _changing = loop {
            if made.is_none() && !usable(&image_path) {
                let function = function.clone().ok_or(RegistryError::NotStored)?;
                let snapshot = self.snapshot(function, &version, &serving, services.clone());
                made = Some(snapshot.await?);
            }
            let changing = self.changing.lock().await;
            if made.is_some() || usable(&image_path) {
                break changing;
            }
        };
        let metrics = {
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            if let Some(shown) = unchanged(&slots) {
                return Ok((Deployment::Unchanged, shown));
            }
            slots.get(name).map(|slot| Arc::clone(&slot.metrics))
        };
        let existed = metrics.is_some();
        let metrics = metrics.unwrap_or_default();
        if let Some((_scratch, made)) = &made {
            // A deploy of the same version may have kept its image meanwhile; either will do.
            // A damaged one is replaced.
            if !usable(&image_path) {
                self.store.keep_image(made, &version)?;
            }
        }
        let (version_owned, serving_owned, counters, retired, poll) =
            (version.clone(), serving.clone(), Arc::clone(&metrics), Arc::clone(&self.retired), self.operator.poll);
        let deployed = blocking(move || -> Result<Deployed, RegistryError> {
            let image = Image::open(&image_path)?;
            Ok(Deployed::start(&version_owned, &serving_owned, Arc::new(image), services, poll, counters, retired)?)
        })
        .await??;
        self.store.activate(name, &version, &serving)?;
        let record = self.record(name)?;
        let slot = Slot { record, metrics, serving: Ok(Arc::new(deployed)) };
        let shown = view(&slot);
        // The old version, if any, drains: requests that took it keep it until they finish.
        let old = self.slots.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), slot);
        drop(old);
        self.collect_garbage();
        info!(function = name, version = short(&version), settings = serving_summary(&serving), "deployed");
        Ok((if existed { Deployment::Updated } else { Deployment::Created }, shown))
    }

    /// Deploys the bundle an OCI registry holds under `reference` as `name`, with the settings
    /// in `query`: the registry puller reads its manifest and, unless `name` already serves
    /// that bundle (its digest is the version) with these settings, its file, which is then
    /// deployed as an uploaded bundle is. A snapshot image is refused before it is fetched.
    pub async fn deploy_reference(
        &self,
        name: &str,
        reference: &str,
        query: &str,
    ) -> Result<(Deployment, View), RegistryError> {
        let puller = self
            .operator
            .puller
            .clone()
            .ok_or_else(|| RegistryError::NoPuller(super::puller::PullerError::Gone("it did not start".into())))?;
        let (serving, packing) = settings::parse(query, &self.operator.defaults)?;
        if let Some(given) = packing.first_given() {
            return Err(settings::SettingsError::InBundle(given.into()).into());
        }
        // A bundle's digest is its version, without extra devices. Every function at a version
        // holds its image, and its services (which come from the bundle): the function is then
        // served from that image with these settings, and is unchanged when it is `name` with
        // these settings already.
        let held: Vec<(bool, String, Serving)> = if serving.devices.is_empty() {
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .filter_map(|(slot_name, slot)| {
                    let deployed = slot.serving.as_ref().ok().filter(|d| d.image_intact())?;
                    let same = Serving { services: deployed.serving.services.clone(), ..serving.clone() };
                    let unchanged = slot_name == name && deployed.serving == same;
                    Some((unchanged, deployed.version.clone(), same))
                })
                .collect()
        } else {
            Vec::new()
        };
        let (text, versions) = (reference.to_string(), held.iter().map(|(_, v, _)| v.clone()).collect::<Vec<_>>());
        let pull = |held: Vec<String>| {
            let (puller, text) = (Arc::clone(&puller), text.clone());
            blocking(move || {
                puller.pull(&text, |listed| {
                    let version = listed.digest.strip_prefix("sha256:").unwrap_or_default();
                    listed.kind == crate::oci::Kind::Image || held.iter().any(|v| v == version)
                })
            })
        };
        let refused = |e| match e {
            e @ super::puller::PullerError::Gone(_) => RegistryError::NoPuller(e),
            e => RegistryError::Reference(e),
        };
        let (listed, mut file) = pull(versions).await?.map_err(refused)?;
        if listed.kind == crate::oci::Kind::Image {
            return Err(RegistryError::ImageByReference(reference.to_string()));
        }
        if file.is_none() {
            let version = listed.digest.trim_start_matches("sha256:");
            let (unchanged, _, same) = held
                .iter()
                .filter(|(_, v, _)| v == version)
                .max_by_key(|(unchanged, ..)| *unchanged)
                .cloned()
                .ok_or(RegistryError::NotStored)?;
            info!(function = name, reference, "held already: nothing pulled");
            if unchanged {
                let shown = self.view(name).ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
                return Ok((Deployment::Unchanged, shown));
            }
            match self.put(name, version.to_string(), same, None).await {
                Err(RegistryError::NotStored) => {
                    // Its image went meanwhile (its last function was deleted): the bundle then.
                    file = pull(Vec::new()).await?.map_err(refused)?.1;
                }
                done => return done,
            }
        }
        let bundle = file.ok_or(RegistryError::NotStored)?;
        info!(function = name, reference, bytes = bundle.len(), "pulled");
        self.deploy(name, bundle, Language::Wasm, query).await
    }

    /// Deploys as `name`, with the settings in `query`, the version the peers at `holders`
    /// serve (each `http://NODE:PORT/v1/images/VERSION`, docs/API.md): from its stored image
    /// when this agent has that version; else at once from the peers, whose image's head the
    /// peer fetcher reads from the first that gives one, and whose pages it reads as VMs touch
    /// them (`host_vmm::lazy`), from another holder when one fails, until the whole image is
    /// here. Then it is stored, and the function served from it like any other
    /// ([`Registry::settle`]). Until then a kept VM cannot be reset (its image is not here), so
    /// reset mode is served as pool mode.
    pub async fn deploy_from_peer(
        self: &Arc<Self>,
        name: &str,
        holders: &[String],
        query: &str,
    ) -> Result<(Deployment, View), RegistryError> {
        let (serving, packing) = settings::parse(query, &self.operator.defaults)?;
        if let Some(given) = packing.first_given() {
            return Err(settings::SettingsError::InBundle(given.into()).into());
        }
        let mut addresses = Vec::with_capacity(holders.len());
        for holder in holders {
            addresses.push(crate::remote::image_address(holder)?);
        }
        let Some((url, version)) = addresses.first().cloned() else {
            return Err(crate::remote::PeerError::Url(String::new()).into());
        };
        if let Some((other, _)) = addresses.iter().find(|(_, v)| *v != version) {
            return Err(crate::remote::PeerError::Mixed(url, other.clone()).into());
        }
        if usable(&self.store.image_path(&version)) {
            info!(function = name, peer = url, "held already: nothing fetched");
            return self.put(name, version, serving, None).await;
        }
        let fetcher =
            self.operator.fetcher.clone().ok_or(RegistryError::NoFetcher(super::fetcher::FetcherError::Gone))?;
        let within =
            Duration::from_millis(serving.timeout_ms).clamp(Duration::from_millis(2), crate::remote::STALL * 2) / 2;
        let urls: Vec<String> = addresses.into_iter().map(|(url, _)| url).collect();
        let (head_fetcher, head_urls) = (Arc::clone(&fetcher), urls.clone());
        let head = blocking(move || {
            let mut failures = Vec::new();
            for url in &head_urls {
                let head = head_fetcher
                    .head(url, within)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| host_vmm::remote::Head::decode(&bytes).map_err(|e| e.to_string()));
                match head {
                    Ok(head) => return Ok(head),
                    Err(why) => failures.push(format!("{url}/head: {why}")),
                }
            }
            Err(crate::remote::PeerError::NoHead(failures.join("; ")))
        })
        .await??;
        let sources = urls
            .iter()
            .map(|url| {
                let pages = super::fetcher::FetchedPages {
                    fetcher: Arc::clone(&fetcher),
                    url: url.clone(),
                    within: within * 2,
                };
                Arc::new(pages) as Arc<dyn host_vmm::lazy::PageSource>
            })
            .collect();
        let image = Arc::new(Image::from_head(head, Arc::new(host_vmm::lazy::Holders::new(sources)), true)?);
        let mut now = serving.clone();
        if now.mode == host_vmm::lane::Mode::Reset {
            now.mode = host_vmm::lane::Mode::Pool;
        }
        let services = resolve(&self.operator.services, &now)?;
        let _changing = self.changing.lock().await;
        let metrics = {
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            slots.get(name).map(|slot| Arc::clone(&slot.metrics))
        };
        let existed = metrics.is_some();
        let metrics = metrics.unwrap_or_default();
        let (version_owned, counters, retired, poll, served) =
            (version.clone(), Arc::clone(&metrics), Arc::clone(&self.retired), self.operator.poll, Arc::clone(&image));
        let deployed =
            blocking(move || Deployed::start(&version_owned, &now, served, services, poll, counters, retired))
                .await??;
        // Not in the store until its image is: a restart before then forgets it.
        let deployed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let record = Record { name: name.to_string(), version: version.clone(), serving: serving.clone(), deployed_at };
        let slot = Slot { record, metrics, serving: Ok(Arc::new(deployed)) };
        let shown = self.shown(&slot);
        let old = self.slots.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), slot);
        drop(old);
        info!(
            function = name,
            version = short(&version),
            peer = url,
            "deployed from a peer: its pages are read as they are touched"
        );
        let registry = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move { registry.settle(&name, &version, serving, image).await });
        Ok((if existed { Deployment::Updated } else { Deployment::Created }, shown))
    }

    /// Once all of `image` (a peer's, which `name` serves at `version`) is here: stores it, and
    /// serves `name` from the stored image with `serving`, unless it was deployed again or
    /// deleted meanwhile. An image that never completes (its peer died) stays served from the
    /// peer, a VM that needs a page that did not arrive failing with why.
    async fn settle(&self, name: &str, version: &str, serving: Serving, image: Arc<Image>) {
        let still = || self.serving(name).ok().flatten().is_some_and(|d| Arc::ptr_eq(d.image(), &image));
        loop {
            let waiting = Arc::clone(&image);
            if blocking(move || waiting.wait_complete(Duration::from_secs(1))).await.unwrap_or(false) {
                break;
            }
            // Deployed again or deleted: the image goes, and its prefetcher stops.
            if !still() {
                return;
            }
            if image.peer_failure().is_some() {
                warn!(
                    function = name,
                    version = short(version),
                    "its image did not arrive whole from its peer; it is served from the peer until deployed again"
                );
                return;
            }
        }
        let scratch = self.store.scratch().join(format!("{}-from-peer.snap", short(version)));
        let (saving, path) = (Arc::clone(&image), scratch.clone());
        let saved = match blocking(move || saving.save(&path)).await {
            Ok(saved) => saved.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = saved {
            warn!(function = name, version = short(version), "storing the image that arrived from its peer: {why}");
            return;
        }
        let kept = self.store.keep_image(&scratch, version);
        let still = still();
        match kept {
            Err(e) => warn!(function = name, "storing the image that arrived from its peer: {e}"),
            Ok(()) if still => match self.put(name, version.to_string(), serving, None).await {
                Ok(_) => info!(
                    function = name,
                    version = short(version),
                    "its image arrived whole from its peer: served from the stored image"
                ),
                Err(e) => warn!(function = name, "serving the image that arrived from its peer: {e}"),
            },
            Ok(()) => self.collect_garbage(),
        }
    }

    /// Cold-boots `function` with `serving`'s extra devices and its `services`, within its
    /// init limit, and snapshots it after init with its working set, in a new directory in the store's scratch space.
    /// Returns the directory (removed when dropped) and the image in it.
    async fn snapshot(
        &self,
        function: Arc<Function>,
        version: &str,
        serving: &Serving,
        services: Services,
    ) -> Result<(tempfile::TempDir, PathBuf), RegistryError> {
        let init_timeout = Duration::from_millis(serving.init_timeout_ms);
        let scratch = self.store.scratch();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-", short(version)))
            .tempdir_in(&scratch)
            .map_err(|source| RegistryError::Scratch { path: scratch.clone(), source })?;
        let (bundle_path, image_path) = (dir.path().join("function.thaw"), dir.path().join("image.snap"));
        let made = image_path.clone();
        let name = function.manifest.name.clone();
        let devices: Vec<DeviceKind> = serving.devices.iter().filter_map(|d| DeviceKind::from_name(d)).collect();
        let status = blocking(move || -> Result<_, SnapshotError> {
            // The bundle file backs the data volume's block device during the cold boot.
            std::fs::write(&bundle_path, &function.bundle)
                .map_err(|source| FilesError::Unwritable { path: bundle_path.clone(), source })?;
            let mut config = VmConfig { devices, ..VmConfig::default() };
            config.backends.services = services;
            crate::devices::add_function_devices(&mut config, &function, &bundle_path)?;
            let sample = function.manifest.sample_request.clone().unwrap_or_default();
            crate::snapshot::snapshot_function(&function, &made, init_timeout, config, Some(sample))
        })
        .await?
        .map_err(|e| {
            // The scratch directory's name is the store's business, not the client's.
            let (name, why) = (name.clone(), e.to_string().replace(&format!("{}/", dir.path().display()), ""));
            if out_of_space(&e) { RegistryError::NoSpace { name, why } } else { RegistryError::Unusable { name, why } }
        })?;
        let (status, init_stderr) = status;
        info!("{status}");
        if !init_stderr.is_empty() {
            info!("{name}: its init wrote to stderr: {}", String::from_utf8_lossy(&init_stderr).trim_end());
        }
        Ok((dir, image_path))
    }

    /// Removes `name`: it takes no new requests, and those it took finish first.
    pub async fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let _changing = self.changing.lock().await;
        if !self.store.remove(name)? {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let old = self.slots.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        drop(old);
        self.collect_garbage();
        info!(function = name, "deleted");
        Ok(())
    }

    fn record(&self, name: &str) -> Result<Record, RegistryError> {
        self.store.record(name)?.ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    fn collect_garbage(&self) {
        match self.store.collect_garbage() {
            Ok(removed) if !removed.is_empty() => {
                info!(images = removed.len(), "removed images no version uses");
            }
            Ok(_) => {}
            Err(error) => warn!(%error, "collecting unused images failed"),
        }
    }
}

impl Registry {
    /// `slot` as the API shows it, a failure's paths in the state directory written `STATE/`.
    fn shown(&self, slot: &Slot) -> View {
        let mut shown = view(slot);
        shown.state = self.store.without_root(&shown.state);
        shown
    }
}

fn view(slot: &Slot) -> View {
    let record = &slot.record;
    View {
        name: record.name.clone(),
        version: record.version.clone(),
        state: match &slot.serving {
            Ok(deployed) if !deployed.image_intact() => {
                "failed: its stored image was cut short under it; deploying it again repairs it".to_string()
            }
            Ok(deployed) if deployed.image().is_remote() => {
                "serving from its peer, whose pages are read as they are touched, until its image is here".to_string()
            }
            Ok(deployed) => match deployed.pool_stats().and_then(|pool| pool.failing) {
                Some(why) => format!("degraded: its pool cannot ready VMs, and retries ({why})"),
                None => "serving".to_string(),
            },
            Err(why) => format!("failed: {why}"),
        },
        settings: record.serving.clone(),
        deployed_at: record.deployed_at,
        live_vms: slot.serving.as_ref().map_or(0, |d| d.live_vms()),
        counters: Arc::clone(&slot.metrics),
    }
}

/// True when `error` comes from a full disk or quota (ENOSPC, EDQUOT) anywhere in its chain.
fn out_of_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// True when the stored image at `path` opens and validates (all but its memory bytes): one
/// cut short or damaged in its metadata is not reused.
fn usable(path: &std::path::Path) -> bool {
    Image::open(path).is_ok()
}

/// Runs `work` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(work).await.map_err(RegistryError::Blocking)
}

/// A function's version: the SHA-256 of its bundle, or, when it has extra `devices` (which its
/// snapshot takes in), of the bundle followed by their names.
fn version(bundle: &[u8], devices: &[String]) -> String {
    if devices.is_empty() {
        return hex::encode(function::sha256(bundle));
    }
    let mut hashed = bundle.to_vec();
    hashed.extend_from_slice(format!("\0thaw-devices:{}", devices.join(",")).as_bytes());
    hex::encode(function::sha256(&hashed))
}

/// The host sockets that `serving`'s vsock ports reach, from the server's named `services`; an
/// error naming the first service the server does not offer.
fn resolve(services: &BTreeMap<String, PathBuf>, serving: &Serving) -> Result<Services, RegistryError> {
    let mut ports = BTreeMap::new();
    for (port, name) in &serving.services {
        let Some(path) = services.get(name) else {
            let offered: Vec<&str> = services.keys().map(String::as_str).collect();
            let offered = if offered.is_empty() { "none".to_string() } else { offered.join(", ") };
            return Err(RegistryError::Service { name: name.clone(), port: *port, offered });
        };
        ports.insert(*port, path.clone());
    }
    Ok(Services { ports, uds_path: None })
}

fn short(version: &str) -> &str {
    &version[..12.min(version.len())]
}

fn serving_summary(serving: &Serving) -> String {
    let mode = match serving.mode {
        host_vmm::Mode::Reset => "reset".to_string(),
        host_vmm::Mode::Pool => format!("pool of {}", serving.pool),
        host_vmm::Mode::Fresh => "fresh".to_string(),
    };
    let mut summary =
        format!("{mode}, {} at once, queue {}, timeout {} ms", serving.concurrency, serving.queue, serving.timeout_ms);
    for device in &serving.devices {
        summary.push_str(&format!(", {device} device"));
    }
    for (port, name) in &serving.services {
        summary.push_str(&format!(", port {port} to {name}"));
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_1_to_64_of_a_small_alphabet() {
        assert!(is_name("hello") && is_name("a.b_c-D9") && is_name(&"x".repeat(64)));
        for bad in ["", "a/b", "../x", "a b", "ünï", "a%2Fb", &"x".repeat(65)] {
            assert!(!is_name(bad), "{bad:?}");
        }
    }
}
