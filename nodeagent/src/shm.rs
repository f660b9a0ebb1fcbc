//! The shared-memory segment store of a node agent (`docs/workers.md`,
//! "Shared-memory segments").
//!
//! A segment is a file `{prefix}{n}` in a tmpfs directory (`/dev/shm`), mode
//! 0600 and owned by the user it was made for, so only that user's processes
//! (and root) can map it. The agent's main loop owns one [`SegmentStore`]; it is
//! not shared between threads and takes no locks.
//!
//! # References
//!
//! A segment's references are the set of its [`Holder`]s: local client
//! connections, jobs, in-flight worker tasks and finished jobs' results. [`SegmentStore::create`] makes
//! a segment with one holder, [`SegmentStore::hold`] adds one (after checking
//! that the requester's uid owns the segment), [`SegmentStore::release`] and
//! [`SegmentStore::release_all`] drop them. A segment whose last holder goes is
//! no longer known by its name: it goes to its owner's pool, or is unlinked.
//!
//! # The pool
//!
//! Writing through a mapping into fresh tmpfs pages costs the kernel a page
//! allocation and zeroing per page; into pages a file already has, only a minor
//! fault. Measured (`measure_page_costs` below, 1 GiB, 2-core EPYC VM, kernel
//! 6.18): fresh 0.83–0.91 s (up to 2.4 s the first time the VM touches the
//! memory), touched 0.54 s, touched and mapped with `MAP_POPULATE` 0.15 s.
//! So a released segment is kept, touched, in a pool of its owner (never
//! handed to another owner: its pages hold the old data), and
//! [`SegmentStore::create`] reuses the smallest pooled segment of the same
//! owner whose size is between the request and [`REUSE_SLACK`] times it. The
//! reused file is
//! 1. checked to be the same inode it was (its owner may have replaced it, e.g.
//!    by a symbolic link, and the agent may run as root), opened with
//!    `O_NOFOLLOW | O_NONBLOCK`;
//! 2. renamed to a fresh name (`RENAME_NOREPLACE`), so names are never reused
//!    and a late release or hold of the old name fails instead of reaching the
//!    new holder's segment;
//! 3. shrunk to the requested size with `ftruncate`: file size and segment size
//!    stay equal, and the pages past the end are freed now rather than later
//!    (freeing touched pages costs about 0.12 s/GiB whenever it happens).
//!
//! A user's pool holds at most [`StoreConfig::pool_bytes_per_user`] bytes: a
//! newly released segment pushes out that user's oldest pooled ones, and one
//! bigger than the bound is unlinked at once.
//!
//! # Quotas and space
//!
//! Quotas bound segment *sizes*, not touched pages (tmpfs allocates a page when
//! it is first written). A user's held bytes are at most
//! [`StoreConfig::user_quota`]; held plus pooled bytes on the node at most
//! [`StoreConfig::node_quota`], where pooled segments (of any owner) are evicted
//! oldest first to make room. A request that cannot fit fails before anything
//! changes, with an error naming the quota, the bytes held and the request.
//!
//! Since touched pages never exceed sizes and the default node quota is half
//! the filesystem, the store alone cannot fill the filesystem: a writer gets
//! `SIGBUS` only if something else fills it. Before creating a file the store
//! checks with `statvfs` that the filesystem has room for it (evicting pooled
//! segments if that makes room): that catches a full filesystem with a clear
//! error at almost no cost. It does not `fallocate` by default: on `/dev/shm`
//! `fallocate` of 1 GiB takes 0.23 s (it allocates and zeroes every page: time
//! the agent's single loop would stall, for pages then charged to the agent's
//! memory cgroup instead of the writer's; a writer then takes 0.50 s instead of
//! 0.85 s, so the work moves rather than grows), while `ftruncate` takes 10 µs.
//! [`StoreConfig::preallocate`] turns it on where that certainty is worth it;
//! a client can also `posix_fallocate` its own segment after opening it.
//!
//! Every error leaves the store as it was, except that pooled segments may have
//! been evicted to make room (they are a cache). [`SegmentStore::open`] removes
//! files left with the store's prefix by an earlier run;
//! [`SegmentStore::close`] and `Drop` remove every file the store made.
//!
//! A user owns the files of their segments, so they can resize or replace them;
//! quotas bound what the agent hands out, not what a user can put in
//! `/dev/shm` on their own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, RenameFlags};

/// A pooled segment is reused for a request of `size` bytes when its size is
/// at most `REUSE_SLACK * size` (and at least `size`).
pub const REUSE_SLACK: u64 = 2;

/// Largest default [`StoreConfig::pool_bytes_per_user`]: 1 GiB.
pub const DEFAULT_POOL_CAP: u64 = 1 << 30;

/// Fresh names tried when the next ones already exist (someone else made them).
const NAME_ATTEMPTS: u32 = 64;

/// Settings of a [`SegmentStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Where segment files live: `/dev/shm` in production.
    pub dir: PathBuf,
    /// Start of every segment's name, e.g. `picloud-<agent id>-`; no `/`.
    pub prefix: String,
    /// Most bytes of held and pooled segments on the node.
    pub node_quota: u64,
    /// Most bytes of held segments of one user (uid).
    pub user_quota: u64,
    /// Most bytes of one user's pooled segments.
    pub pool_bytes_per_user: u64,
    /// `fallocate` new segments, so that a full filesystem fails the request
    /// rather than a writer (`SIGBUS`); costs about 0.23 s per GiB.
    pub preallocate: bool,
}

impl StoreConfig {
    /// Settings sized from the filesystem of `dir` (`statvfs`):
    /// - `node_quota`: half its size, leaving the rest to other tmpfs users
    ///   (`/dev/shm` is half the RAM by default, so a quarter of the RAM);
    /// - `user_quota`: the node quota (one user may use the whole node);
    /// - `pool_bytes_per_user`: an eighth of the node quota, at most
    ///   [`DEFAULT_POOL_CAP`], so idle pooled pages stay a small part of memory;
    /// - `preallocate`: off.
    pub fn for_dir(dir: impl Into<PathBuf>, prefix: impl Into<String>) -> Result<Self, ShmError> {
        let dir = dir.into();
        let st = nix::sys::statvfs::statvfs(&dir).map_err(|e| ShmError::Io {
            op: "statvfs",
            path: dir.clone(),
            error: e.into(),
        })?;
        // `as`: the field types are u64 or narrower, depending on the target.
        let size = (st.blocks() as u64).saturating_mul(st.fragment_size() as u64);
        let node_quota = size / 2;
        Ok(StoreConfig {
            dir,
            prefix: prefix.into(),
            node_quota,
            user_quota: node_quota,
            pool_bytes_per_user: (node_quota / 8).min(DEFAULT_POOL_CAP),
            preallocate: false,
        })
    }
}

/// The user a segment belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Something that holds a reference to a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Holder {
    /// A connection on `agent.sock`, by connection number.
    Client(u64),
    /// A job, by sequence number.
    Job(u64),
    /// A worker's in-flight task, by tag.
    Task(u64),
    /// The result of a finished Python job, by job sequence number, until the
    /// server forgets the job.
    Result(u64),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Client(n) => write!(f, "client connection {n}"),
            Holder::Job(n) => write!(f, "job {n}"),
            Holder::Task(n) => write!(f, "task {n}"),
            Holder::Result(n) => write!(f, "the result of job {n}"),
        }
    }
}

/// A held segment, as the `SEGMENT` message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes (the file's size).
    pub size: u64,
}

/// Totals of a store, for `picloud nodes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of segments someone holds.
    pub held_bytes: u64,
    /// How many segments someone holds.
    pub held_segments: usize,
    /// Bytes of pooled segments.
    pub pooled_bytes: u64,
    /// How many pooled segments.
    pub pooled_segments: usize,
}

/// A segment store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The configured prefix cannot start a file name.
    #[error("invalid segment name prefix {prefix:?}: it must be non-empty and contain no '/'")]
    InvalidPrefix {
        /// The prefix.
        prefix: String,
    },
    /// A system call on a segment file or the store's directory failed.
    #[error("cannot {op} {}: {error}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// A new file could not be given to the segment's owner.
    #[error("cannot give {} to uid {} gid {}: {error}", path.display(), owner.uid, owner.gid)]
    Chown {
        /// The file.
        path: PathBuf,
        /// Who it was for.
        owner: Owner,
        /// The cause.
        error: io::Error,
    },
    /// A request for 0 bytes.
    #[error("a segment must have at least 1 byte")]
    ZeroSize,
    /// A request larger than a file can be.
    #[error("a segment of {requested} bytes is larger than a file can be")]
    TooLarge {
        /// The requested size.
        requested: u64,
    },
    /// The request would put the user past their quota.
    #[error(
        "a segment of {requested} bytes would exceed the shared-memory quota of uid {uid}: \
         {quota} bytes per user, {held} bytes held"
    )]
    UserQuota {
        /// The user.
        uid: u32,
        /// Their quota.
        quota: u64,
        /// Bytes of segments they hold.
        held: u64,
        /// The requested size.
        requested: u64,
    },
    /// The request would put the node past its quota, even with every pooled
    /// segment evicted.
    #[error(
        "a segment of {requested} bytes would exceed the node's shared-memory quota: \
         {quota} bytes, {held} bytes held"
    )]
    NodeQuota {
        /// The node's quota.
        quota: u64,
        /// Bytes of segments held by all users.
        held: u64,
        /// The requested size.
        requested: u64,
    },
    /// The filesystem has no room for the segment.
    #[error(
        "no space in {} for a segment of {requested} bytes ({available} bytes free; {step})",
        dir.display()
    )]
    NoSpace {
        /// The store's directory.
        dir: PathBuf,
        /// The requested size.
        requested: u64,
        /// Bytes free on the filesystem, as `statvfs` saw them afterwards.
        available: u64,
        /// What found it out, e.g. `fallocate failed`.
        step: &'static str,
    },
    /// No held segment has this name.
    #[error("no segment named {name:?} on this node (never created, or released)")]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The requester does not own the segment.
    #[error("uid {uid} may not hold segment {name:?}: it belongs to uid {owner}")]
    NotOwner {
        /// The segment.
        name: String,
        /// The requester.
        uid: u32,
        /// The segment's owner.
        owner: u32,
    },
    /// The holder does not hold the segment.
    #[error("{holder} does not hold segment {name:?}")]
    NotHeld {
        /// The segment.
        name: String,
        /// Who released it.
        holder: Holder,
    },
}

/// A segment file and what it was when the store made it.
#[derive(Debug)]
struct SegFile {
    path: PathBuf,
    owner: Owner,
    size: u64,
    dev: u64,
    ino: u64,
}

/// A segment someone holds.
#[derive(Debug)]
struct Held {
    file: SegFile,
    holders: Vec<Holder>,
}

/// The shared-memory segments of one agent; see the module documentation.
#[derive(Debug)]
pub struct SegmentStore {
    config: StoreConfig,
    /// The store's effective ids: files for another owner are chowned.
    me: Owner,
    /// Number of the next name.
    next_name: u64,
    held: HashMap<String, Held>,
    by_holder: HashMap<Holder, HashSet<String>>,
    held_bytes: u64,
    held_by_uid: HashMap<u32, u64>,
    /// Pooled files by age (a sequence number, oldest first).
    pool: BTreeMap<u64, SegFile>,
    next_age: u64,
    /// (owner, size, age) of every pooled file, for best-fit reuse.
    pool_fit: BTreeSet<(Owner, u64, u64)>,
    /// (uid, age) of every pooled file, for a user's oldest.
    pool_by_uid: BTreeSet<(u32, u64)>,
    pooled_bytes: u64,
    pooled_by_uid: HashMap<u32, u64>,
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> ShmError + 'p {
    move |error| ShmError::Io { op, path: path.to_path_buf(), error }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::ENOSPC | Errno::EFBIG | Errno::EDQUOT))
}

/// Unlinks `path`; a file already gone is not an error.
fn unlink(path: &Path) -> Result<(), ShmError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(ShmError::Io { op: "remove", path: path.into(), error: e })
        }
        _ => Ok(()),
    }
}

fn unlink_or_warn(path: &Path) {
    if let Err(e) = unlink(path) {
        tracing::warn!("{e}");
    }
}

impl SegmentStore {
    /// Opens a store in `config.dir`, removing files an earlier run left there
    /// with `config.prefix` (directories are left alone). Creates nothing.
    pub fn open(config: StoreConfig) -> Result<Self, ShmError> {
        if config.prefix.is_empty() || config.prefix.contains('/') {
            return Err(ShmError::InvalidPrefix { prefix: config.prefix });
        }
        let dir = &config.dir;
        let mut removed = 0;
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            if !entry.file_name().as_encoded_bytes().starts_with(config.prefix.as_bytes()) {
                continue;
            }
            let path = entry.path();
            if entry.file_type().map_err(io_err("stat", &path))?.is_dir() {
                continue;
            }
            fs::remove_file(&path).map_err(io_err("remove leftover segment", &path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!("removed {removed} leftover segments {}{}*", dir.display(), config.prefix);
        }
        let me = Owner { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() };
        Ok(SegmentStore {
            config,
            me,
            next_name: 1,
            held: HashMap::new(),
            by_holder: HashMap::new(),
            held_bytes: 0,
            held_by_uid: HashMap::new(),
            pool: BTreeMap::new(),
            next_age: 0,
            pool_fit: BTreeSet::new(),
            pool_by_uid: BTreeSet::new(),
            pooled_bytes: 0,
            pooled_by_uid: HashMap::new(),
        })
    }

    /// The store's settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Creates a segment of `size` bytes for `owner`, held by `holder`: a
    /// pooled segment of the same owner when one fits, else a new file.
    pub fn create(&mut self, owner: Owner, size: u64, holder: Holder) -> Result<SegmentInfo, ShmError> {
        if size == 0 {
            return Err(ShmError::ZeroSize);
        }
        if i64::try_from(size).is_err() {
            return Err(ShmError::TooLarge { requested: size });
        }
        let user_held = self.held_by_uid.get(&owner.uid).copied().unwrap_or(0);
        if user_held.saturating_add(size) > self.config.user_quota {
            return Err(ShmError::UserQuota {
                uid: owner.uid,
                quota: self.config.user_quota,
                held: user_held,
                requested: size,
            });
        }
        if self.held_bytes.saturating_add(size) > self.config.node_quota {
            return Err(ShmError::NodeQuota {
                quota: self.config.node_quota,
                held: self.held_bytes,
                requested: size,
            });
        }
        let reuse = self
            .pool_fit
            .range((owner, size, 0)..=(owner, size.saturating_mul(REUSE_SLACK), u64::MAX))
            .next()
            .map(|&(_, _, age)| age);
        // The reused segment's bytes move from pooled to held (as `size`).
        let reused = reuse.map_or(0, |age| self.pool[&age].size);
        // Terminates: with every other pooled segment gone, the total is
        // held + size, within the quota (checked above).
        while self.held_bytes + self.pooled_bytes - reused + size > self.config.node_quota {
            let oldest = *self.pool.keys().find(|&&age| Some(age) != reuse).expect("pool covers the excess");
            self.evict(oldest);
        }
        if let Some(age) = reuse {
            let file = self.take_pooled(age);
            match self.recycle(file, size) {
                Ok((name, file)) => return Ok(self.insert_held(name, file, holder)),
                Err(e) => tracing::warn!("not reusing a pooled segment: {e}"),
            }
        }
        if !self.config.preallocate {
            self.check_space(size)?;
        }
        let (name, file) = self.new_file(owner, size)?;
        Ok(self.insert_held(name, file, holder))
    }

    /// Adds `holder` to the holders of segment `name`, for a requester with
    /// uid `uid`, which must own the segment or be root. Holding twice is
    /// holding once.
    pub fn hold(&mut self, name: &str, holder: Holder, uid: u32) -> Result<(), ShmError> {
        let seg = self.held.get_mut(name).ok_or_else(|| ShmError::Unknown { name: name.into() })?;
        if uid != 0 && uid != seg.file.owner.uid {
            return Err(ShmError::NotOwner { name: name.into(), uid, owner: seg.file.owner.uid });
        }
        if !seg.holders.contains(&holder) {
            seg.holders.push(holder);
            self.by_holder.entry(holder).or_default().insert(name.to_string());
        }
        Ok(())
    }

    /// Removes `holder` from the holders of segment `name`; the last one gone,
    /// the segment goes to its owner's pool (or is unlinked).
    pub fn release(&mut self, name: &str, holder: Holder) -> Result<(), ShmError> {
        let seg = self.held.get_mut(name).ok_or_else(|| ShmError::Unknown { name: name.into() })?;
        let at = seg
            .holders
            .iter()
            .position(|&h| h == holder)
            .ok_or_else(|| ShmError::NotHeld { name: name.into(), holder })?;
        seg.holders.swap_remove(at);
        if let Some(names) = self.by_holder.get_mut(&holder) {
            names.remove(name);
            if names.is_empty() {
                self.by_holder.remove(&holder);
            }
        }
        if self.held[name].holders.is_empty() {
            let seg = self.held.remove(name).expect("just looked up");
            self.unhold(seg.file);
        }
        Ok(())
    }

    /// Releases every segment `holder` holds (a client disconnected, a job was
    /// forgotten, a task ended); returns how many.
    pub fn release_all(&mut self, holder: Holder) -> usize {
        let names = self.by_holder.remove(&holder).unwrap_or_default();
        for name in &names {
            let seg = self.held.get_mut(name).expect("by_holder names held segments");
            seg.holders.retain(|&h| h != holder);
            if seg.holders.is_empty() {
                let seg = self.held.remove(name).expect("just looked up");
                self.unhold(seg.file);
            }
        }
        names.len()
    }

    /// The file of held segment `name`.
    pub fn path_of(&self, name: &str) -> Result<&Path, ShmError> {
        self.get(name).map(|seg| seg.file.path.as_path())
    }

    /// Held segment `name`.
    pub fn info(&self, name: &str) -> Result<SegmentInfo, ShmError> {
        self.get(name).map(|seg| SegmentInfo {
            name: name.into(),
            path: seg.file.path.clone(),
            size: seg.file.size,
        })
    }

    /// The holders of held segment `name`, in no particular order.
    pub fn holders(&self, name: &str) -> Result<&[Holder], ShmError> {
        self.get(name).map(|seg| seg.holders.as_slice())
    }

    /// Totals over the store.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            held_bytes: self.held_bytes,
            held_segments: self.held.len(),
            pooled_bytes: self.pooled_bytes,
            pooled_segments: self.pool.len(),
        }
    }

    /// Bytes of segments user `uid` holds.
    pub fn held_bytes_of(&self, uid: u32) -> u64 {
        self.held_by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Removes every file of the store, held or pooled; reports the first
    /// failure (after trying them all). Dropping the store does the same and
    /// logs failures.
    pub fn close(mut self) -> Result<(), ShmError> {
        self.remove_all()
    }

    fn get(&self, name: &str) -> Result<&Held, ShmError> {
        self.held.get(name).ok_or_else(|| ShmError::Unknown { name: name.into() })
    }

    fn remove_all(&mut self) -> Result<(), ShmError> {
        let mut first = None;
        let held = self.held.drain().map(|(_, seg)| seg.file);
        for file in held.chain(std::mem::take(&mut self.pool).into_values()) {
            if let Err(e) = unlink(&file.path) {
                first.get_or_insert(e);
            }
        }
        self.by_holder.clear();
        self.held_bytes = 0;
        self.held_by_uid.clear();
        self.pool_fit.clear();
        self.pool_by_uid.clear();
        self.pooled_bytes = 0;
        self.pooled_by_uid.clear();
        first.map_or(Ok(()), Err)
    }

    fn insert_held(&mut self, name: String, file: SegFile, holder: Holder) -> SegmentInfo {
        let info = SegmentInfo { name: name.clone(), path: file.path.clone(), size: file.size };
        self.held_bytes += file.size;
        *self.held_by_uid.entry(file.owner.uid).or_default() += file.size;
        self.by_holder.entry(holder).or_default().insert(name.clone());
        self.held.insert(name, Held { file, holders: vec![holder] });
        info
    }

    /// A segment lost its last holder: pool it, or unlink it.
    fn unhold(&mut self, file: SegFile) {
        let uid = file.owner.uid;
        self.held_bytes -= file.size;
        match self.held_by_uid.get_mut(&uid) {
            Some(n) if *n > file.size => *n -= file.size,
            _ => {
                self.held_by_uid.remove(&uid);
            }
        }
        let cap = self.config.pool_bytes_per_user;
        if file.size > cap {
            unlink_or_warn(&file.path);
            return;
        }
        while self.pooled_by_uid.get(&uid).copied().unwrap_or(0) + file.size > cap {
            let &(_, oldest) =
                self.pool_by_uid.range((uid, 0)..=(uid, u64::MAX)).next().expect("uid has pooled bytes");
            self.evict(oldest);
        }
        let age = self.next_age;
        self.next_age += 1;
        self.pool_fit.insert((file.owner, file.size, age));
        self.pool_by_uid.insert((uid, age));
        self.pooled_bytes += file.size;
        *self.pooled_by_uid.entry(uid).or_default() += file.size;
        self.pool.insert(age, file);
    }

    /// Takes pooled file `age` out of the pool.
    fn take_pooled(&mut self, age: u64) -> SegFile {
        let file = self.pool.remove(&age).expect("a pooled age");
        self.pool_fit.remove(&(file.owner, file.size, age));
        self.pool_by_uid.remove(&(file.owner.uid, age));
        self.pooled_bytes -= file.size;
        let uid = file.owner.uid;
        match self.pooled_by_uid.get_mut(&uid) {
            Some(n) if *n > file.size => *n -= file.size,
            _ => {
                self.pooled_by_uid.remove(&uid);
            }
        }
        file
    }

    /// Unlinks pooled file `age`.
    fn evict(&mut self, age: u64) {
        let file = self.take_pooled(age);
        unlink_or_warn(&file.path);
    }

    /// Bytes free on the store's filesystem.
    fn available(&self) -> Result<u64, ShmError> {
        let st = nix::sys::statvfs::statvfs(&self.config.dir).map_err(|e| ShmError::Io {
            op: "statvfs",
            path: self.config.dir.clone(),
            error: e.into(),
        })?;
        // `as`: the field types are u64 or narrower, depending on the target.
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }

    /// Checks that the filesystem has `size` bytes free, evicting pooled
    /// segments (oldest first) while it has not.
    fn check_space(&mut self, size: u64) -> Result<(), ShmError> {
        loop {
            let available = self.available()?;
            if available >= size {
                return Ok(());
            }
            match self.pool.keys().next() {
                Some(&oldest) => {
                    self.evict(oldest);
                }
                None => {
                    return Err(ShmError::NoSpace {
                        dir: self.config.dir.clone(),
                        requested: size,
                        available,
                        step: "checked with statvfs",
                    });
                }
            }
        }
    }

    fn no_space(&self, size: u64, step: &'static str) -> ShmError {
        ShmError::NoSpace {
            dir: self.config.dir.clone(),
            requested: size,
            available: self.available().unwrap_or(0),
            step,
        }
    }

    fn next_path(&mut self) -> (String, PathBuf) {
        let name = format!("{}{}", self.config.prefix, self.next_name);
        self.next_name += 1;
        let path = self.config.dir.join(&name);
        (name, path)
    }

    /// Creates a file of `size` bytes for `owner`; on failure removes it.
    fn new_file(&mut self, owner: Owner, size: u64) -> Result<(String, SegFile), ShmError> {
        let mut attempts = 0;
        let (name, path, file) = loop {
            let (name, path) = self.next_path();
            // O_EXCL: never a file or link someone else put there; std adds O_CLOEXEC.
            match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path) {
                Ok(file) => break (name, path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < NAME_ATTEMPTS => {
                    attempts += 1
                }
                Err(e) if is_no_space(&e) => return Err(self.no_space(size, "creating the file failed")),
                Err(e) => return Err(ShmError::Io { op: "create", path, error: e }),
            }
        };
        match self.set_up(&file, &path, owner, size) {
            Ok(meta) => Ok((name, SegFile { path, owner, size, dev: meta.dev(), ino: meta.ino() })),
            Err(e) => {
                drop(file);
                unlink_or_warn(&path);
                Err(e)
            }
        }
    }

    /// Mode, owner and size of a new file.
    fn set_up(&self, file: &File, path: &Path, owner: Owner, size: u64) -> Result<fs::Metadata, ShmError> {
        // The umask may have taken bits off 0600.
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))?;
        if owner != self.me {
            std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid))
                .map_err(|error| ShmError::Chown { path: path.into(), owner, error })?;
        }
        file.set_len(size).map_err(|e| {
            if is_no_space(&e) { self.no_space(size, "ftruncate failed") } else { io_err("resize", path)(e) }
        })?;
        if self.config.preallocate {
            // Fits: `create` checked `size` against i64::MAX.
            nix::fcntl::fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, size as i64).map_err(
                |e| {
                    let e = io::Error::from(e);
                    if is_no_space(&e) {
                        self.no_space(size, "fallocate failed")
                    } else {
                        io_err("fallocate", path)(e)
                    }
                },
            )?;
        }
        file.metadata().map_err(io_err("stat", path))
    }

    /// Renames pooled `file` to a fresh name and sizes it to `size` (at most
    /// its size). On failure the file is unlinked.
    fn recycle(&mut self, mut file: SegFile, size: u64) -> Result<(String, SegFile), ShmError> {
        match self.recycle_steps(&mut file.path, (file.dev, file.ino), size) {
            Ok(name) => {
                file.size = size;
                Ok((name, file))
            }
            Err(e) => {
                unlink_or_warn(&file.path);
                Err(e)
            }
        }
    }

    /// The steps of [`Self::recycle`]; `path` follows the file when renamed.
    fn recycle_steps(
        &mut self,
        path: &mut PathBuf,
        inode: (u64, u64),
        size: u64,
    ) -> Result<String, ShmError> {
        let same = |m: &fs::Metadata| m.file_type().is_file() && (m.dev(), m.ino()) == inode;
        let replaced = |path: &Path| ShmError::Io {
            op: "reuse",
            path: path.into(),
            error: io::Error::other("the file was replaced since the store made it"),
        };
        // 1. Still our inode? Checked before opening, so that a FIFO or device
        // put in its place is never opened; opened without following a link
        // and checked again, as the name may change in between.
        let meta = fs::symlink_metadata(&*path).map_err(io_err("stat", path))?;
        if !same(&meta) {
            return Err(replaced(path));
        }
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&*path)
            .map_err(io_err("open", path))?;
        if !same(&f.metadata().map_err(io_err("stat", path))?) {
            return Err(replaced(path));
        }
        // 2. A fresh name.
        let mut attempts = 0;
        let name = loop {
            let (name, new_path) = self.next_path();
            match nix::fcntl::renameat2(None, &*path, None, &new_path, RenameFlags::RENAME_NOREPLACE) {
                Ok(()) => {
                    *path = new_path;
                    break name;
                }
                Err(Errno::EEXIST) if attempts < NAME_ATTEMPTS => attempts += 1,
                Err(e) => return Err(ShmError::Io { op: "rename", path: path.clone(), error: e.into() }),
            }
        };
        // 3. The requested size.
        f.set_len(size).map_err(io_err("resize", path))?;
        Ok(name)
    }
}

#[cfg(test)]
impl SegmentStore {
    /// Checks every invariant of the store's state against itself and the
    /// directory; panics on the first broken one.
    fn sanity_check(&self) {
        let c = &self.config;
        let mut held_by_uid: HashMap<u32, u64> = HashMap::new();
        let mut files = BTreeSet::new();
        for (name, seg) in &self.held {
            assert!(!seg.holders.is_empty(), "{name} held by nobody");
            assert_eq!(seg.file.path, c.dir.join(name));
            for h in &seg.holders {
                assert!(self.by_holder[h].contains(name), "{h} of {name} not indexed");
            }
            *held_by_uid.entry(seg.file.owner.uid).or_default() += seg.file.size;
            files.insert(seg.file.path.clone());
        }
        for (h, names) in &self.by_holder {
            assert!(!names.is_empty(), "{h} indexed with nothing");
            for name in names {
                assert!(self.held[name].holders.contains(h), "{h} indexed for {name}");
            }
        }
        assert_eq!(held_by_uid, self.held_by_uid);
        assert_eq!(held_by_uid.values().sum::<u64>(), self.held_bytes);
        assert!(held_by_uid.values().all(|&n| n <= c.user_quota), "user quota");
        let mut pooled_by_uid: HashMap<u32, u64> = HashMap::new();
        for (&age, file) in &self.pool {
            assert!(self.pool_fit.contains(&(file.owner, file.size, age)));
            assert!(self.pool_by_uid.contains(&(file.owner.uid, age)));
            assert!(age < self.next_age);
            *pooled_by_uid.entry(file.owner.uid).or_default() += file.size;
            assert!(files.insert(file.path.clone()), "{} both held and pooled", file.path.display());
        }
        assert_eq!(self.pool_fit.len(), self.pool.len());
        assert_eq!(self.pool_by_uid.len(), self.pool.len());
        assert_eq!(pooled_by_uid, self.pooled_by_uid);
        assert_eq!(pooled_by_uid.values().sum::<u64>(), self.pooled_bytes);
        assert!(pooled_by_uid.values().all(|&n| n <= c.pool_bytes_per_user), "pool bound");
        assert!(self.held_bytes + self.pooled_bytes <= c.node_quota, "node quota");
        // The directory holds exactly these files of the prefix, of these sizes.
        let on_disk: BTreeSet<PathBuf> = fs::read_dir(&c.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&c.prefix))
            .collect();
        assert_eq!(on_disk, files);
        for seg in self.held.values().map(|h| &h.file).chain(self.pool.values()) {
            let meta = fs::metadata(&seg.path).unwrap();
            assert_eq!((meta.len(), meta.ino(), meta.uid()), (seg.size, seg.ino, seg.owner.uid));
        }
    }
}

impl Drop for SegmentStore {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            tracing::warn!("closing the segment store: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Command;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A tempdir on tmpfs, like the production directory, where there is one.
    fn tmp() -> tempfile::TempDir {
        if Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }
            .unwrap()
    }

    fn me() -> Owner {
        Owner { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() }
    }

    /// A second owner: `nobody` when running as root, else none.
    fn other() -> Option<Owner> {
        if root() {
            Some(Owner { uid: 65534, gid: 65534 })
        } else {
            eprintln!("skipped: needs root to create segments for another user");
            None
        }
    }

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            dir: dir.to_path_buf(),
            prefix: "picloud-t-".into(),
            node_quota: 1 << 20,
            user_quota: 1 << 20,
            pool_bytes_per_user: 1 << 20,
            preallocate: false,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn create_makes_a_private_file_of_the_size() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(me(), 5000, Holder::Client(1)).unwrap();
        assert!(seg.name.starts_with("picloud-t-"), "{seg:?}");
        assert_eq!(seg.path, dir.path().join(&seg.name));
        assert_eq!(seg.size, 5000);
        let meta = fs::metadata(&seg.path).unwrap();
        assert_eq!(meta.len(), 5000);
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (me().uid, me().gid));
        assert_eq!(store.info(&seg.name).unwrap(), seg);
        assert_eq!(store.path_of(&seg.name).unwrap(), seg.path);
        assert_eq!(store.holders(&seg.name).unwrap(), [Holder::Client(1)]);
        let seg2 = store.create(me(), 1, Holder::Client(1)).unwrap();
        assert_ne!(seg2.name, seg.name);
        assert_eq!(
            store.stats(),
            StoreStats { held_bytes: 5001, held_segments: 2, pooled_bytes: 0, pooled_segments: 0 }
        );
        assert_eq!(store.held_bytes_of(me().uid), 5001);
        store.sanity_check();
    }

    #[test]
    fn zero_and_huge_sizes_are_refused() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let err = store.create(me(), 0, Holder::Client(1)).unwrap_err();
        assert!(matches!(err, ShmError::ZeroSize), "{err}");
        assert!(err.to_string().contains("at least 1 byte"), "{err}");
        let err = store.create(me(), u64::MAX, Holder::Client(1)).unwrap_err();
        assert!(matches!(err, ShmError::TooLarge { requested: u64::MAX }), "{err}");
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn holders_count_references() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(me(), 100, Holder::Task(9)).unwrap();
        store.hold(&seg.name, Holder::Job(7), me().uid).unwrap();
        store.hold(&seg.name, Holder::Job(7), me().uid).unwrap(); // twice is once
        store.release(&seg.name, Holder::Task(9)).unwrap();
        assert_eq!(store.holders(&seg.name).unwrap(), [Holder::Job(7)]);
        assert!(seg.path.exists());
        let err = store.release(&seg.name, Holder::Task(9)).unwrap_err();
        assert!(matches!(err, ShmError::NotHeld { holder: Holder::Task(9), .. }), "{err}");
        assert_eq!(err.to_string(), format!("task 9 does not hold segment {:?}", seg.name));

        store.release(&seg.name, Holder::Job(7)).unwrap();
        // Pooled: the file stays, the name is gone.
        assert!(seg.path.exists());
        assert!(matches!(store.info(&seg.name), Err(ShmError::Unknown { .. })));
        assert!(matches!(store.hold(&seg.name, Holder::Job(8), me().uid), Err(ShmError::Unknown { .. })));
        assert_eq!(
            store.stats(),
            StoreStats { held_bytes: 0, held_segments: 0, pooled_bytes: 100, pooled_segments: 1 }
        );
        assert_eq!(store.held_bytes_of(me().uid), 0);
        store.sanity_check();
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let errs = [
            store.hold("picloud-t-99", Holder::Job(1), 0).unwrap_err(),
            store.release("picloud-t-99", Holder::Job(1)).unwrap_err(),
            store.info("picloud-t-99").unwrap_err(),
            store.path_of("picloud-t-99").unwrap_err(),
        ];
        for err in errs {
            assert!(matches!(&err, ShmError::Unknown { name } if name == "picloud-t-99"), "{err}");
            assert!(err.to_string().contains("no segment named \"picloud-t-99\""), "{err}");
        }
    }

    #[test]
    fn only_the_owner_or_root_may_hold() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(me(), 10, Holder::Client(1)).unwrap();
        let stranger = me().uid.wrapping_add(1).max(1);
        let err = store.hold(&seg.name, Holder::Client(2), stranger).unwrap_err();
        assert!(matches!(err, ShmError::NotOwner { uid, owner, .. } if uid == stranger && owner == me().uid));
        assert!(err.to_string().contains(&format!("uid {stranger} may not hold")), "{err}");
        assert_eq!(store.holders(&seg.name).unwrap(), [Holder::Client(1)]);
        store.hold(&seg.name, Holder::Client(3), me().uid).unwrap();
        store.hold(&seg.name, Holder::Job(4), 0).unwrap();
        assert_eq!(store.holders(&seg.name).unwrap().len(), 3);
    }

    #[test]
    fn release_all_drops_one_holder_everywhere() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let a = store.create(me(), 10, Holder::Client(1)).unwrap();
        let b = store.create(me(), 20, Holder::Client(1)).unwrap();
        let c = store.create(me(), 30, Holder::Client(2)).unwrap();
        store.hold(&b.name, Holder::Job(5), me().uid).unwrap();
        assert_eq!(store.release_all(Holder::Client(1)), 2);
        assert!(store.info(&a.name).is_err(), "a had no other holder");
        assert_eq!(store.holders(&b.name).unwrap(), [Holder::Job(5)]);
        assert_eq!(store.holders(&c.name).unwrap(), [Holder::Client(2)]);
        assert_eq!(store.release_all(Holder::Client(1)), 0);
        assert_eq!(
            store.stats(),
            StoreStats { held_bytes: 50, held_segments: 2, pooled_bytes: 10, pooled_segments: 1 }
        );
    }

    #[test]
    fn same_owner_reuses_a_pooled_file_under_a_new_name() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let first = store.create(me(), 1000, Holder::Client(1)).unwrap();
        fs::write(&first.path, vec![7u8; 1000]).unwrap();
        let inode = ino(&first.path);
        store.release(&first.name, Holder::Client(1)).unwrap();

        // Too small for the pooled one to be worth it (1000 > 2 * 400).
        let small = store.create(me(), 400, Holder::Client(1)).unwrap();
        assert_ne!(ino(&small.path), inode);
        // Too big for it.
        let big = store.create(me(), 1001, Holder::Client(1)).unwrap();
        assert_ne!(ino(&big.path), inode);

        let again = store.create(me(), 600, Holder::Client(2)).unwrap();
        assert_eq!(ino(&again.path), inode, "same file");
        assert_ne!(again.name, first.name, "fresh name");
        assert!(!first.path.exists(), "old name gone");
        assert_eq!(fs::metadata(&again.path).unwrap().len(), 600, "shrunk to the request");
        assert_eq!(fs::read(&again.path).unwrap(), vec![7u8; 600], "the owner's own old data");
        assert_eq!(store.stats().pooled_segments, 0);
        assert_eq!(store.stats().held_bytes, 400 + 1001 + 600);
        // The old name stays dead.
        assert!(matches!(store.release(&first.name, Holder::Client(1)), Err(ShmError::Unknown { .. })));
        store.sanity_check();
    }

    #[test]
    fn reuse_picks_the_smallest_fit() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let segs: Vec<_> =
            [900, 500, 700].iter().map(|&n| store.create(me(), n, Holder::Job(1)).unwrap()).collect();
        let inodes: Vec<_> = segs.iter().map(|s| ino(&s.path)).collect();
        store.release_all(Holder::Job(1));
        let got = store.create(me(), 450, Holder::Job(2)).unwrap();
        assert_eq!(ino(&got.path), inodes[1]);
        let got = store.create(me(), 450, Holder::Job(2)).unwrap();
        assert_eq!(ino(&got.path), inodes[2]);
        let got = store.create(me(), 450, Holder::Job(2)).unwrap();
        assert_eq!(ino(&got.path), inodes[0]);
    }

    #[test]
    fn another_owner_never_gets_a_pooled_file() {
        let Some(nobody) = other() else { return };
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let mine = store.create(me(), 1000, Holder::Client(1)).unwrap();
        let inode = ino(&mine.path);
        store.release(&mine.name, Holder::Client(1)).unwrap();
        let theirs = store.create(nobody, 1000, Holder::Client(2)).unwrap();
        assert_ne!(ino(&theirs.path), inode);
        assert_eq!(store.stats().pooled_segments, 1, "mine still pooled");
        // Nor one of the same uid with another group.
        let other_group = store.create(Owner { gid: 65534, ..me() }, 1000, Holder::Client(2)).unwrap();
        assert_ne!(ino(&other_group.path), inode);
        let mine_again = store.create(me(), 1000, Holder::Client(1)).unwrap();
        assert_eq!(ino(&mine_again.path), inode);
    }

    #[test]
    fn segments_for_another_user_are_theirs_alone() {
        let Some(nobody) = other() else { return };
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(nobody, 4096, Holder::Client(1)).unwrap();
        let meta = fs::metadata(&seg.path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.mode() & 0o7777, 0o600);
        store.hold(&seg.name, Holder::Client(2), 65534).unwrap();
        assert!(matches!(store.hold(&seg.name, Holder::Client(3), 1000), Err(ShmError::NotOwner { .. })));
        // Reused, it keeps its owner and mode.
        store.release_all(Holder::Client(1));
        store.release_all(Holder::Client(2));
        let again = store.create(nobody, 4000, Holder::Client(1)).unwrap();
        assert_eq!(ino(&again.path), meta.ino());
        let meta = fs::metadata(&again.path).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (65534, 0o600));
    }

    #[test]
    fn a_non_root_store_cannot_give_files_away() {
        if root() {
            eprintln!("skipped: root may give files to anyone");
            return;
        }
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let err = store.create(Owner { uid: 65534, gid: 65534 }, 10, Holder::Client(1)).unwrap_err();
        assert!(matches!(err, ShmError::Chown { .. }), "{err}");
        assert!(files(dir.path()).is_empty(), "half-made file removed");
        assert_eq!(store.stats(), StoreStats::default());
    }

    #[test]
    fn a_replaced_pooled_file_is_not_followed() {
        let dir = tmp();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(me(), 1000, Holder::Client(1)).unwrap();
        let inode = ino(&seg.path);
        store.release(&seg.name, Holder::Client(1)).unwrap();
        // The owner swaps the pooled file for a link to something else.
        fs::remove_file(&seg.path).unwrap();
        std::os::unix::fs::symlink(&victim, &seg.path).unwrap();

        let again = store.create(me(), 600, Holder::Client(1)).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "not truncated through the link");
        assert_ne!(ino(&again.path), inode);
        assert_eq!(fs::metadata(&again.path).unwrap().len(), 600);
        assert!(fs::symlink_metadata(&seg.path).is_err(), "the planted link is removed");
        store.sanity_check();
        assert_eq!(store.stats().pooled_segments, 0);
    }

    #[test]
    fn a_pooled_file_replaced_by_a_fifo_does_not_block() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        let seg = store.create(me(), 1000, Holder::Client(1)).unwrap();
        store.release(&seg.name, Holder::Client(1)).unwrap();
        fs::remove_file(&seg.path).unwrap();
        nix::unistd::mkfifo(&seg.path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO for writing with no reader would block forever.
        let again = store.create(me(), 600, Holder::Client(1)).unwrap();
        assert!(fs::metadata(&again.path).unwrap().file_type().is_file());
        assert!(fs::symlink_metadata(&seg.path).is_err(), "the FIFO is removed");
    }

    #[test]
    fn pool_is_bounded_per_user() {
        let dir = tmp();
        let mut store =
            SegmentStore::open(StoreConfig { pool_bytes_per_user: 1500, ..config(dir.path()) }).unwrap();
        let a = store.create(me(), 1000, Holder::Job(1)).unwrap();
        let b = store.create(me(), 1000, Holder::Job(2)).unwrap();
        let c = store.create(me(), 1600, Holder::Job(3)).unwrap();
        store.release_all(Holder::Job(1));
        store.release_all(Holder::Job(2));
        assert!(!a.path.exists(), "oldest pushed out");
        assert!(b.path.exists(), "newest pooled");
        store.release_all(Holder::Job(3));
        assert!(!c.path.exists(), "bigger than the bound: unlinked");
        assert_eq!(
            store.stats(),
            StoreStats { held_bytes: 0, held_segments: 0, pooled_bytes: 1000, pooled_segments: 1 }
        );
        assert_eq!(files(dir.path()), [b.name.as_str()]);
        store.sanity_check();
    }

    #[test]
    fn user_quota_bounds_held_bytes() {
        let dir = tmp();
        let mut store = SegmentStore::open(StoreConfig { user_quota: 2000, ..config(dir.path()) }).unwrap();
        let a = store.create(me(), 1500, Holder::Client(1)).unwrap();
        let err = store.create(me(), 600, Holder::Client(1)).unwrap_err();
        assert!(
            matches!(err, ShmError::UserQuota { uid, quota: 2000, held: 1500, requested: 600 }
                if uid == me().uid),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "a segment of 600 bytes would exceed the shared-memory quota of uid {}: \
                 2000 bytes per user, 1500 bytes held",
                me().uid
            )
        );
        assert_eq!(files(dir.path()), [a.name.as_str()]);
        store.create(me(), 500, Holder::Client(1)).unwrap();
        // Pooled bytes do not count against the user.
        store.release_all(Holder::Client(1));
        store.create(me(), 2000, Holder::Client(1)).unwrap();
        if let Some(nobody) = other() {
            store.create(nobody, 2000, Holder::Client(2)).unwrap();
        }
    }

    #[test]
    fn node_quota_evicts_pooled_segments_oldest_first() {
        let dir = tmp();
        let mut store = SegmentStore::open(StoreConfig { node_quota: 3000, ..config(dir.path()) }).unwrap();
        let held = store.create(me(), 1000, Holder::Job(1)).unwrap();
        let old = store.create(me(), 700, Holder::Job(2)).unwrap();
        let new = store.create(me(), 500, Holder::Job(3)).unwrap();
        store.release_all(Holder::Job(2));
        store.release_all(Holder::Job(3));
        assert_eq!(store.stats().pooled_bytes, 1200);

        // Held 1000 + request 2001 > 3000: refused, the pool untouched.
        let err = store.create(me(), 2001, Holder::Job(4)).unwrap_err();
        assert!(matches!(err, ShmError::NodeQuota { quota: 3000, held: 1000, requested: 2001 }), "{err}");
        assert_eq!(
            err.to_string(),
            "a segment of 2001 bytes would exceed the node's shared-memory quota: 3000 bytes, 1000 bytes held"
        );
        assert_eq!(store.stats().pooled_bytes, 1200);
        assert_eq!(files(dir.path()).len(), 3);

        // 1000 + 1200 + 1500 > 3000: the oldest pooled segment makes room.
        let got = store.create(me(), 1500, Holder::Job(4)).unwrap();
        assert!(!old.path.exists());
        assert!(new.path.exists());
        assert_eq!(
            store.stats(),
            StoreStats { held_bytes: 2500, held_segments: 2, pooled_bytes: 500, pooled_segments: 1 }
        );
        assert_eq!(files(dir.path()), {
            let mut v = vec![held.name, got.name, new.name];
            v.sort();
            v
        });
    }

    #[test]
    fn node_quota_evicts_as_many_as_needed() {
        let dir = tmp();
        let mut store = SegmentStore::open(StoreConfig { node_quota: 3000, ..config(dir.path()) }).unwrap();
        store.create(me(), 1000, Holder::Job(1)).unwrap();
        for _ in 0..3 {
            store.create(me(), 300, Holder::Job(2)).unwrap();
        }
        store.release_all(Holder::Job(2));
        // 1000 + 900 + 1800 is 700 over: two pooled segments are not enough.
        store.create(me(), 1800, Holder::Job(3)).unwrap();
        assert_eq!(store.stats().pooled_segments, 0);
        store.sanity_check();
    }

    #[test]
    fn node_quota_counts_a_reused_segment_once() {
        let dir = tmp();
        let mut store = SegmentStore::open(StoreConfig { node_quota: 1000, ..config(dir.path()) }).unwrap();
        let a = store.create(me(), 1000, Holder::Job(1)).unwrap();
        let inode = ino(&a.path);
        store.release_all(Holder::Job(1));
        let b = store.create(me(), 900, Holder::Job(2)).unwrap();
        assert_eq!(ino(&b.path), inode);
    }

    #[test]
    fn open_removes_leftovers_only() {
        let dir = tmp();
        for name in ["picloud-t-3", "picloud-t-junk", "picloud-other-1", "unrelated"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        fs::create_dir(dir.path().join("picloud-t-dir")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("picloud-t-link")).unwrap();
        let store = SegmentStore::open(config(dir.path())).unwrap();
        assert_eq!(files(dir.path()), ["picloud-other-1", "picloud-t-dir", "unrelated"]);
        assert_eq!(store.stats(), StoreStats::default());
    }

    #[test]
    fn open_refuses_a_bad_prefix_or_dir() {
        let dir = tmp();
        for prefix in ["", "a/b"] {
            let err =
                SegmentStore::open(StoreConfig { prefix: prefix.into(), ..config(dir.path()) }).unwrap_err();
            assert!(matches!(err, ShmError::InvalidPrefix { .. }), "{err}");
        }
        let missing = dir.path().join("missing");
        let err = SegmentStore::open(config(&missing)).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot list {}", missing.display())), "{err}");
    }

    #[test]
    fn a_name_taken_by_someone_else_is_skipped() {
        let dir = tmp();
        let mut store = SegmentStore::open(config(dir.path())).unwrap();
        fs::write(dir.path().join("picloud-t-1"), b"planted").unwrap();
        let seg = store.create(me(), 10, Holder::Client(1)).unwrap();
        assert_eq!(seg.name, "picloud-t-2");
        assert_eq!(fs::read(dir.path().join("picloud-t-1")).unwrap(), b"planted");
    }

    #[test]
    fn drop_and_close_remove_every_file() {
        let dir = tmp();
        fs::write(dir.path().join("unrelated"), b"x").unwrap();
        for close in [false, true] {
            let mut store = SegmentStore::open(config(dir.path())).unwrap();
            store.create(me(), 10, Holder::Client(1)).unwrap();
            store.create(me(), 20, Holder::Job(1)).unwrap();
            store.release_all(Holder::Client(1));
            assert_eq!(files(dir.path()).len(), 3);
            if close {
                store.close().unwrap();
            } else {
                drop(store);
            }
            assert_eq!(files(dir.path()), ["unrelated"], "close: {close}");
        }
    }

    #[test]
    fn config_for_dir_derives_quotas_from_the_filesystem() {
        let dir = tmp();
        let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let size = st.blocks() as u64 * st.fragment_size() as u64;
        let c = StoreConfig::for_dir(dir.path(), "picloud-x-").unwrap();
        assert_eq!(c.node_quota, size / 2);
        assert_eq!(c.user_quota, c.node_quota);
        assert_eq!(c.pool_bytes_per_user, (size / 16).min(DEFAULT_POOL_CAP));
        assert!(!c.preallocate);
        assert!(StoreConfig::for_dir(dir.path().join("missing"), "p").is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create { owner: usize, size: u64, holder: Holder },
        Hold { seg: usize, holder: Holder, as_owner: bool },
        Release { seg: usize, holder: Holder },
        ReleaseAll(Holder),
    }

    fn any_holder() -> impl Strategy<Value = Holder> {
        prop_oneof![(0u64..3).prop_map(Holder::Client), (0u64..3).prop_map(Holder::Job)]
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..2, 1u64..2000, any_holder())
                .prop_map(|(owner, size, holder)| Op::Create { owner, size, holder }),
            2 => (any::<usize>(), any_holder(), any::<bool>())
                .prop_map(|(seg, holder, as_owner)| Op::Hold { seg, holder, as_owner }),
            3 => (any::<usize>(), any_holder()).prop_map(|(seg, holder)| Op::Release { seg, holder }),
            1 => any_holder().prop_map(Op::ReleaseAll),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random operations against a model of who holds what; after each,
        /// every invariant of the store holds (quotas, pool bounds, indexes,
        /// the directory's contents).
        #[test]
        fn random_operations_keep_the_store_consistent(ops in proptest::collection::vec(any_op(), 1..40)) {
            let dir = tmp();
            let config = StoreConfig {
                node_quota: 6000,
                user_quota: 4000,
                pool_bytes_per_user: 1500,
                ..config(dir.path())
            };
            let mut store = SegmentStore::open(config).unwrap();
            let owners = [me(), if root() { Owner { uid: 65534, gid: 65534 } } else { me() }];
            let stranger = me().uid.wrapping_add(1).max(1);
            let mut names: Vec<String> = Vec::new();
            let mut model: HashMap<String, (u32, BTreeSet<Holder>)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Create { owner, size, holder } => match store.create(owners[owner], size, holder) {
                        Ok(seg) => {
                            prop_assert!(!names.contains(&seg.name), "name {} reused", seg.name);
                            prop_assert_eq!(seg.size, size);
                            names.push(seg.name.clone());
                            model.insert(seg.name, (owners[owner].uid, BTreeSet::from([holder])));
                        }
                        Err(e) => prop_assert!(
                            matches!(e, ShmError::UserQuota { .. } | ShmError::NodeQuota { .. }),
                            "{e}"
                        ),
                    },
                    Op::Hold { seg, holder, as_owner } if !names.is_empty() => {
                        let name = &names[seg % names.len()];
                        let uid = match model.get(name) {
                            Some(&(owner, _)) if as_owner => owner,
                            _ => stranger,
                        };
                        let allowed = model.get(name).is_some_and(|(owner, _)| *owner == uid);
                        let got = store.hold(name, holder, uid);
                        prop_assert_eq!(got.is_ok(), allowed, "{:?}", got);
                        if allowed {
                            model.get_mut(name).unwrap().1.insert(holder);
                        }
                    }
                    Op::Release { seg, holder } if !names.is_empty() => {
                        let name = &names[seg % names.len()];
                        let holds = model.get(name).is_some_and(|(_, h)| h.contains(&holder));
                        let got = store.release(name, holder);
                        prop_assert_eq!(got.is_ok(), holds, "{:?}", got);
                        if holds {
                            let holders = &mut model.get_mut(name).unwrap().1;
                            holders.remove(&holder);
                            if holders.is_empty() {
                                model.remove(name);
                            }
                        }
                    }
                    Op::ReleaseAll(holder) => {
                        let expected = model.values().filter(|(_, h)| h.contains(&holder)).count();
                        prop_assert_eq!(store.release_all(holder), expected);
                        model.retain(|_, (_, h)| {
                            h.remove(&holder);
                            !h.is_empty()
                        });
                    }
                    _ => {}
                }
                store.sanity_check();
                for (name, (_, holders)) in &model {
                    let got: BTreeSet<Holder> = store.holders(name).unwrap().iter().copied().collect();
                    prop_assert_eq!(&got, holders);
                }
                prop_assert_eq!(store.stats().held_segments, model.len());
            }
            drop(store);
            prop_assert!(files(dir.path()).is_empty());
        }
    }

    /// A small tmpfs mounted on a tempdir for one test, unmounted on drop.
    struct TinyTmpfs {
        dir: tempfile::TempDir,
    }

    impl TinyTmpfs {
        fn mount(options: &str) -> Option<Self> {
            if !root() {
                eprintln!("skipped: needs root to mount a tmpfs");
                return None;
            }
            let dir = tmp();
            match Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(dir.path()).status()
            {
                Ok(s) if s.success() => Some(TinyTmpfs { dir }),
                other => {
                    eprintln!("skipped: cannot mount a tmpfs ({other:?})");
                    None
                }
            }
        }

        /// A store config on it whose quotas are no limit.
        fn config(&self) -> StoreConfig {
            StoreConfig { node_quota: 1 << 30, user_quota: 1 << 30, ..config(self.dir.path()) }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for TinyTmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }

    #[test]
    fn a_full_filesystem_is_a_clear_error() {
        let Some(fs_) = TinyTmpfs::mount("size=1m") else { return };
        let mut store = SegmentStore::open(fs_.config()).unwrap();
        let kept = store.create(me(), 4096, Holder::Client(1)).unwrap();
        let before = store.stats();
        let err = store.create(me(), 2 << 20, Holder::Client(1)).unwrap_err();
        assert!(
            matches!(err, ShmError::NoSpace { requested: 2097152, available, .. } if available <= 1 << 20),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("no space in {} for a segment of 2097152 bytes", fs_.path().display()))
        );
        assert_eq!(store.stats(), before);
        assert_eq!(files(fs_.path()), [kept.name]);
    }

    #[test]
    fn a_full_filesystem_evicts_pooled_segments_first() {
        let Some(fs_) = TinyTmpfs::mount("size=1m") else { return };
        let mut store = SegmentStore::open(fs_.config()).unwrap();
        let seg = store.create(me(), 800 << 10, Holder::Client(1)).unwrap();
        fs::write(&seg.path, vec![1u8; 800 << 10]).unwrap(); // touch its pages
        store.release_all(Holder::Client(1));
        // Another user of the filesystem can't have 800 KiB, our pool can.
        let got = store.create(me(), 600 << 10, Holder::Client(2));
        assert!(got.is_ok(), "reuses the pooled one: {got:?}");
        store.release_all(Holder::Client(2));
        let err = store.create(me(), 900 << 10, Holder::Client(2));
        assert!(err.is_ok(), "evicts the pooled 600 KiB to find room: {err:?}");
        assert_eq!(store.stats().pooled_segments, 0);
    }

    #[test]
    fn preallocation_fails_at_create_and_cleans_up() {
        let Some(fs_) = TinyTmpfs::mount("size=1m") else { return };
        let mut store = SegmentStore::open(StoreConfig { preallocate: true, ..fs_.config() }).unwrap();
        let kept = store.create(me(), 512 << 10, Holder::Client(1)).unwrap();
        assert!(fs::metadata(&kept.path).unwrap().blocks() * 512 >= 512 << 10, "pages allocated");
        let before = store.stats();
        let err = store.create(me(), 768 << 10, Holder::Client(1)).unwrap_err();
        assert!(matches!(err, ShmError::NoSpace { step: "fallocate failed", .. }), "{err}");
        assert!(err.to_string().contains("fallocate failed"), "{err}");
        assert_eq!(store.stats(), before);
        assert_eq!(files(fs_.path()), [kept.name], "half-made file removed");
    }

    #[test]
    fn running_out_of_inodes_is_a_clear_error() {
        let Some(fs_) = TinyTmpfs::mount("size=1m,nr_inodes=3") else { return };
        let mut store = SegmentStore::open(fs_.config()).unwrap();
        let mut made = Vec::new();
        let err = loop {
            match store.create(me(), 10, Holder::Client(1)) {
                Ok(seg) => made.push(seg.name),
                Err(e) => break e,
            }
            assert!(made.len() < 10, "nr_inodes=3 not enforced");
        };
        assert!(matches!(err, ShmError::NoSpace { step: "creating the file failed", .. }), "{err}");
        assert_eq!(store.stats().held_segments, made.len());
        made.sort();
        assert_eq!(files(fs_.path()), made);
    }

    /// `fallocate` allocates every page up front; `ftruncate` none.
    #[test]
    fn preallocation_allocates_pages_and_ftruncate_does_not() {
        let dir = tmp();
        let mut plain = SegmentStore::open(config(dir.path())).unwrap();
        let seg = plain.create(me(), 256 << 10, Holder::Client(1)).unwrap();
        assert_eq!(fs::metadata(&seg.path).unwrap().blocks(), 0);
        let mut pre = SegmentStore::open(StoreConfig {
            prefix: "picloud-u-".into(),
            preallocate: true,
            ..config(dir.path())
        })
        .unwrap();
        let seg = pre.create(me(), 256 << 10, Holder::Client(1)).unwrap();
        assert!(fs::metadata(&seg.path).unwrap().blocks() * 512 >= 256 << 10);
    }

    /// The numbers in the module documentation, for 1 GiB in /dev/shm:
    /// `cargo test -p picloud-nodeagent --release measure_page_costs -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: 1 GiB of memory and several seconds"]
    fn measure_page_costs() {
        use std::time::Instant;
        const SIZE: usize = 1 << 30;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();

        /// Maps `file`, writes every byte, unmaps; returns seconds.
        fn write_all_pages(file: &File, flags: libc::c_int) -> f64 {
            let t = Instant::now();
            // SAFETY: a fresh shared mapping of SIZE bytes of a file that is
            // at least that long; nothing else maps it in this process.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | flags,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            // SAFETY: `p` is the start of a writable mapping of SIZE bytes.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, SIZE) };
            // SAFETY: unmaps exactly the mapping made above, no longer used.
            assert_eq!(unsafe { libc::munmap(p, SIZE) }, 0);
            t.elapsed().as_secs_f64()
        }

        for _ in 0..3 {
            let path = dir.path().join("seg");
            let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
            let t = Instant::now();
            f.set_len(SIZE as u64).unwrap();
            let ftruncate = t.elapsed().as_secs_f64();
            let fresh = write_all_pages(&f, 0);
            let touched = write_all_pages(&f, 0);
            let populated = write_all_pages(&f, libc::MAP_POPULATE);
            let t = Instant::now();
            f.set_len(0).unwrap();
            let shrink = t.elapsed().as_secs_f64();
            let t = Instant::now();
            nix::fcntl::fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, SIZE as i64).unwrap();
            let fallocate = t.elapsed().as_secs_f64();
            assert!(f.metadata().unwrap().blocks() * 512 >= SIZE as u64);
            let after_fallocate = write_all_pages(&f, 0);
            drop(f);
            fs::remove_file(&path).unwrap();
            println!(
                "1 GiB: ftruncate {ftruncate:.5}s, fallocate {fallocate:.3}s, write fresh {fresh:.3}s, \
                 touched {touched:.3}s, touched+MAP_POPULATE {populated:.3}s, after fallocate \
                 {after_fallocate:.3}s, shrink touched to 0 {shrink:.3}s"
            );
        }
    }
}
