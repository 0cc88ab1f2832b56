//! Data-parallel training across processes: the collective interface and its backends.
//!
//! A job is `W` processes (ranks) started by a launcher — `mpirun -np W align dpo ...` or
//! Slurm's `srun` — each running the whole command. Every rank builds the same policy, walks the
//! same data cursor and prepares the same global step; rank `r` computes the micro-batches
//! `i ≡ r (mod W)` of it, the gradients (LoRA adapters only, or every weight with `--full`) are
//! summed across ranks, and every rank takes the same clipped AdamW step. With the loss of each
//! micro-batch scaled by `1/n` of the global step, the sum is exactly the single-process
//! gradient of the same global batch, up to the order of the float additions. Rank 0 alone
//! writes the run folder (metrics, plots, checkpoints, the final adapter); every rank resumes
//! from the same checkpoint.
//!
//! Work that is not a gradient — sampling and scoring GRPO/PPO rollouts, held-out evaluation —
//! is shared out with [`shard_map`]: chunk `k` of `n` is computed by rank `k mod W`, its result
//! (any [`Wire`] type: an exact little-endian codec, f32/f64 by their bits) broadcast from that
//! rank, so that every rank returns all `n` results in order, as one process would.
//!
//! Backends, behind cargo features (the default build has neither and runs one process):
//! * `mpi`: Open MPI / MPICH through rsmpi (`mpi` crate); gradients travel as one f32 buffer
//!   per step through `MPI_Allreduce` (host memory, so for CPU runs).
//! * `nccl` (implies `cuda` and `mpi`): gradients stay on the GPU and are summed by
//!   `ncclAllReduce`; MPI starts the ranks and carries NCCL's unique id from rank 0 to the rest.
//!
//! A rank that fails calls `MPI_Abort`, so the others stop instead of waiting in a collective
//! forever; a rank killed by a signal makes the launcher end the job.

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

static RANK: AtomicUsize = AtomicUsize::new(0);
static WORLD: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// The communicator, owned by the thread that initialised it (MPI is initialised with
    /// `MPI_THREAD_FUNNELED`-style use: only the main thread calls collectives).
    static COMM: RefCell<Option<Box<dyn Collective>>> = const { RefCell::new(None) };
}

/// What a data-parallel step needs from a collective library.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum across ranks, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Rank `root`'s bytes into `buf` on every rank (same length everywhere).
    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// End the whole job (every rank) with `code`.
    fn abort(&self, code: i32) -> !;
    /// The backend's name for messages.
    fn name(&self) -> &'static str;
}

/// This process's rank (0 in a single-process run).
pub fn rank() -> usize {
    RANK.load(Ordering::Relaxed)
}

/// The number of ranks (1 in a single-process run).
pub fn world() -> usize {
    WORLD.load(Ordering::Relaxed)
}

/// Rank 0 writes the run folder and prints progress.
pub fn is_main() -> bool {
    rank() == 0
}

/// The rank and size a launcher gave this process, from its environment: Open MPI's
/// `OMPI_COMM_WORLD_*`, PMI's `PMI_*` (MPICH, Intel MPI), Slurm's `SLURM_PROCID`/`SLURM_NTASKS`.
pub fn launcher_env() -> Option<(usize, usize, &'static str)> {
    const PAIRS: &[(&str, &str)] = &[
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    for (r, s) in PAIRS {
        let rank = std::env::var(r).ok().and_then(|v| v.parse().ok());
        let size = std::env::var(s).ok().and_then(|v| v.parse().ok());
        if let (Some(rank), Some(size)) = (rank, size) {
            return Some((rank, size, s));
        }
    }
    None
}

/// Set up the collective backend when a launcher started this process as one of several
/// ranks; a single process (no launcher, or a launcher with one rank) needs none. Call once,
/// from the main thread, before any training.
pub fn init() -> Result<()> {
    let Some((r, w, var)) = launcher_env() else {
        return Ok(());
    };
    if w <= 1 {
        return Ok(());
    }
    let comm = backend(r, w, var)?;
    RANK.store(comm.rank(), Ordering::Relaxed);
    WORLD.store(comm.world(), Ordering::Relaxed);
    COMM.with(|c| *c.borrow_mut() = Some(comm));
    Ok(())
}

#[cfg(feature = "mpi")]
fn backend(r: usize, w: usize, _var: &str) -> Result<Box<dyn Collective>> {
    let comm = mpi_backend::Mpi::init()?;
    if comm.rank() != r || comm.world() != w {
        return Err(Error::Msg(format!(
            "MPI says rank {} of {}, the launcher's environment rank {r} of {w}",
            comm.rank(),
            comm.world()
        )));
    }
    Ok(Box::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn backend(r: usize, w: usize, var: &str) -> Result<Box<dyn Collective>> {
    Err(Error::Msg(format!(
        "this process is rank {r} of {w} ({var}={w}), but this align was built without \
         data-parallel support: rebuild with `cargo build --release --features mpi` (Open MPI: \
         apt-get install libopenmpi-dev openmpi-bin libclang-dev), or run one process"
    )))
}

/// Run `f` with the communicator; `None` in a single-process run.
pub fn with_comm<T>(f: impl FnOnce(Option<&dyn Collective>) -> T) -> T {
    COMM.with(|c| f(c.borrow().as_deref()))
}

/// Sum `buf` across ranks (no-op in a single process).
pub fn all_reduce_sum_f32(buf: &mut [f32]) -> Result<()> {
    with_comm(|c| c.map_or(Ok(()), |c| c.all_reduce_sum_f32(buf)))
}

/// Sum `buf` across ranks (no-op in a single process).
pub fn all_reduce_sum_f64(buf: &mut [f64]) -> Result<()> {
    with_comm(|c| c.map_or(Ok(()), |c| c.all_reduce_sum_f64(buf)))
}

/// Rank 0's string on every rank (unchanged in a single process).
pub fn broadcast_string(s: &str) -> Result<String> {
    with_comm(|c| {
        let Some(c) = c else {
            return Ok(s.to_string());
        };
        let mut len = [s.len() as f64];
        if c.rank() != 0 {
            len[0] = 0.0;
        }
        c.all_reduce_sum_f64(&mut len)?;
        let mut buf = vec![0u8; len[0] as usize];
        if c.rank() == 0 {
            buf.copy_from_slice(s.as_bytes());
        }
        c.broadcast(0, &mut buf)?;
        String::from_utf8(buf).map_err(|e| Error::Msg(format!("broadcast string: {e}")))
    })
}

/// Values that travel between ranks as bytes, exactly: numbers little-endian, floats as their
/// bit patterns (a text format could round them), lengths as u64.
pub trait Wire: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn take(buf: &mut &[u8]) -> Result<Self>;
}

fn take_bytes<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        return Err(Error::Msg(format!(
            "{}a message from another rank ended early ({} bytes left, {n} wanted)",
            prefix(),
            buf.len()
        )));
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

macro_rules! wire_number {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn take(buf: &mut &[u8]) -> Result<Self> {
                let b = take_bytes(buf, std::mem::size_of::<$t>())?;
                Ok(<$t>::from_le_bytes(b.try_into().expect("sized above")))
            }
        }
    )*};
}
wire_number!(u8, u32, u64, f32, f64);

impl Wire for usize {
    fn put(&self, out: &mut Vec<u8>) {
        (*self as u64).put(out)
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        Ok(u64::take(buf)? as usize)
    }
}

impl Wire for () {
    fn put(&self, _: &mut Vec<u8>) {}
    fn take(_: &mut &[u8]) -> Result<Self> {
        Ok(())
    }
}

impl Wire for String {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        out.extend_from_slice(self.as_bytes());
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        let n = usize::take(buf)?;
        String::from_utf8(take_bytes(buf, n)?.to_vec())
            .map_err(|e| Error::Msg(format!("{}a string from another rank: {e}", prefix())))
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        for x in self {
            x.put(out);
        }
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        let n = usize::take(buf)?;
        // every element takes at least a byte, except `()`: no allocation from a bad length
        let mut v = Vec::with_capacity(n.min(buf.len()));
        for _ in 0..n {
            v.push(T::take(buf)?);
        }
        Ok(v)
    }
}

impl<A: Wire, B: Wire> Wire for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        Ok((A::take(buf)?, B::take(buf)?))
    }
}

impl<A: Wire, B: Wire, C: Wire> Wire for (A, B, C) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
        self.2.put(out);
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        Ok((A::take(buf)?, B::take(buf)?, C::take(buf)?))
    }
}

impl<K: Wire + Ord, V: Wire> Wire for std::collections::BTreeMap<K, V> {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        for (k, v) in self {
            k.put(out);
            v.put(out);
        }
    }
    fn take(buf: &mut &[u8]) -> Result<Self> {
        let n = usize::take(buf)?;
        let mut m = std::collections::BTreeMap::new();
        for _ in 0..n {
            let k = K::take(buf)?;
            m.insert(k, V::take(buf)?);
        }
        Ok(m)
    }
}

/// Work cut into `n` chunks, shared out over the ranks: rank `r` computes `f(k)` for the
/// chunks `k ≡ r (mod W)`, then the owner of each chunk broadcasts its result, so that every
/// rank returns all `n` results in chunk order. A single process computes `f(0), …, f(n−1)`.
/// A chunk's result must not depend on which rank computed it (the callers seed each chunk's
/// random draws by its index): then W ranks return exactly what one process returns.
pub fn shard_map<T: Wire>(n: usize, mut f: impl FnMut(usize) -> Result<T>) -> Result<Vec<T>> {
    let (r, w) = (rank(), world());
    if w <= 1 {
        return (0..n).map(f).collect();
    }
    let mut mine = Vec::new();
    for k in (r..n).step_by(w) {
        mine.push(f(k)?);
    }
    let mut mine = mine.into_iter();
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let owner = k % w;
        if owner == r {
            let v = mine.next().expect("one result per owned chunk");
            let mut bytes = Vec::new();
            v.put(&mut bytes);
            let mut len = (bytes.len() as u64).to_le_bytes();
            with_comm(|c| -> Result<()> {
                let c = c.expect("world > 1 has a communicator");
                c.broadcast(owner, &mut len)?;
                c.broadcast(owner, &mut bytes)
            })?;
            out.push(v);
        } else {
            let mut len = [0u8; 8];
            let bytes = with_comm(|c| -> Result<Vec<u8>> {
                let c = c.expect("world > 1 has a communicator");
                c.broadcast(owner, &mut len)?;
                let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
                c.broadcast(owner, &mut bytes)?;
                Ok(bytes)
            })?;
            let mut rd = bytes.as_slice();
            let v = T::take(&mut rd)?;
            if !rd.is_empty() {
                return Err(Error::Msg(format!(
                    "{}chunk {k} from rank {owner}: {} bytes left over",
                    prefix(),
                    rd.len()
                )));
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// [`shard_map`] over `items` cut into consecutive slices of `chunk` (the last one shorter):
/// `f(k, slice_k)`, every rank returning all results in order.
pub fn shard_chunks<I, T: Wire>(
    items: &[I],
    chunk: usize,
    mut f: impl FnMut(usize, &[I]) -> Result<T>,
) -> Result<Vec<T>> {
    let chunk = chunk.max(1);
    shard_map(items.len().div_ceil(chunk), |k| {
        f(k, &items[k * chunk..((k + 1) * chunk).min(items.len())])
    })
}

/// Wait for every rank (no-op in a single process).
pub fn barrier() -> Result<()> {
    with_comm(|c| c.map_or(Ok(()), |c| c.barrier()))
}

/// A rank that failed: print its error and end every rank of the job, so none waits forever in
/// a collective. Returns only in a single-process run.
pub fn abort_job(msg: &str, code: i32) {
    with_comm(|c| {
        if let Some(c) = c {
            eprintln!(
                "rank {} of {}: {msg}\nstopping every rank of the job ({})",
                c.rank(),
                c.world(),
                c.name()
            );
            c.abort(code);
        }
    })
}

/// This rank's index among the ranks on its machine (the GPU it uses with `--device cuda`):
/// `OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID` (MPICH) or `SLURM_LOCALID`; 0 otherwise.
pub fn local_rank() -> usize {
    if world() <= 1 {
        return 0;
    }
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().and_then(|s| s.parse().ok()))
    .unwrap_or(0)
}

/// A rank's message prefix (`"rank 1: "`) in a multi-rank job, empty otherwise.
pub fn prefix() -> String {
    if world() > 1 {
        format!("rank {}: ", rank())
    } else {
        String::new()
    }
}

/// Sum one step's gradients and metrics across ranks (see [`crate::trainer::Trainer::train_step`]).
///
/// `grads` holds this rank's accumulated gradients (each micro-batch's loss already scaled by
/// `1/n` of the global step); afterwards it holds the sum over ranks for every variable that
/// has a gradient on some rank (a variable with none anywhere stays absent, as in one process,
/// so AdamW leaves it alone). `metrics` (each a sum of `v/n` terms) becomes the global mean and
/// gains `nonfinite_losses`, the number of non-finite micro-batch losses over all ranks.
/// Every rank must call it with the same variables and metric names; a mismatch is an error.
pub fn reduce_step(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[(String, candle_core::Var)],
    metrics: &mut std::collections::BTreeMap<String, f64>,
    nonfinite_local: usize,
) -> Result<()> {
    use candle_core::{DType, Tensor};
    // metrics first: they carry the checks that the ranks agree
    let keys: Vec<String> = metrics.keys().cloned().collect();
    let signature = keys
        .iter()
        .flat_map(|k| k.bytes())
        .fold(17u64, |h, b| (h.wrapping_mul(31) + b as u64) % (1 << 40));
    let mut m: Vec<f64> = Vec::with_capacity(keys.len() + 3 + vars.len());
    m.push(nonfinite_local as f64);
    m.push(keys.len() as f64);
    m.push(signature as f64);
    m.extend(keys.iter().map(|k| metrics[k]));
    m.extend(
        vars.iter()
            .map(|(_, v)| f64::from(u8::from(grads.get(v.as_tensor()).is_some()))),
    );
    all_reduce_sum_f64(&mut m)?;
    let w = world() as f64;
    if m[1] != keys.len() as f64 * w || m[2] != signature as f64 * w {
        return Err(Error::Msg(format!(
            "{}the ranks computed different metrics this step (these: {keys:?}); every rank \
             must run the same command with the same settings",
            prefix()
        )));
    }
    for (k, v) in keys.iter().zip(&m[3..]) {
        metrics.insert(k.clone(), *v);
    }
    metrics.insert("nonfinite_losses".into(), m[0]);
    let present = &m[3 + keys.len()..];
    #[cfg(feature = "nccl")]
    if let Some(t) = vars.first().map(|(_, v)| v.as_tensor()) {
        if let candle_core::Device::Cuda(dev) = t.device() {
            return nccl_backend::reduce_grads(dev, grads, vars, present);
        }
    }
    // gradients: one flat f32 buffer in the order of `vars`
    let mut sizes = Vec::with_capacity(vars.len());
    let mut flat: Vec<f32> = Vec::new();
    for ((_, v), p) in vars.iter().zip(present) {
        if *p == 0.0 {
            sizes.push(0);
            continue;
        }
        let n = v.as_tensor().elem_count();
        match grads.get(v.as_tensor()) {
            Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, n)),
        }
        sizes.push(n);
    }
    all_reduce_sum_f32(&mut flat)?;
    let mut off = 0;
    for ((_, v), n) in vars.iter().zip(sizes) {
        if n == 0 {
            continue;
        }
        let t = v.as_tensor();
        let g =
            Tensor::from_slice(&flat[off..off + n], t.dims(), t.device())?.to_dtype(t.dtype())?;
        grads.insert(t, g);
        off += n;
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use super::Collective;
    use crate::error::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    pub struct Mpi {
        // dropped last: MPI_Finalize
        world: SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| Error::Msg("MPI was already initialised in this process".into()))?;
            let world = universe.world();
            Ok(Mpi {
                world,
                _universe: universe,
            })
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
        fn name(&self) -> &'static str {
            "MPI"
        }
    }
}

/// NCCL: the gradients are summed on the GPUs; MPI carries the communicator's unique id.
#[cfg(feature = "nccl")]
mod nccl_backend {
    use super::{rank, with_comm, world};
    use crate::error::{Error, Result};
    use candle_core::backprop::GradStore;
    use candle_core::{CudaDevice, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor, Var};
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use std::rc::Rc;

    thread_local! {
        static NCCL: std::cell::RefCell<Option<Rc<Comm>>> = const { std::cell::RefCell::new(None) };
    }

    fn nccl_err(e: impl std::fmt::Debug) -> Error {
        Error::Msg(format!("rank {} of {}: NCCL: {e:?}", rank(), world()))
    }

    /// The job's NCCL communicator on `dev`, made on first use: rank 0 draws the unique id and
    /// MPI broadcasts it.
    fn comm(dev: &CudaDevice) -> Result<Rc<Comm>> {
        if let Some(c) = NCCL.with(|n| n.borrow().clone()) {
            return Ok(c);
        }
        let id = if rank() == 0 {
            Id::new().map_err(nccl_err)?
        } else {
            Id::uninit([0; 128])
        };
        let mut bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        with_comm(|c| {
            c.ok_or_else(|| Error::Msg("NCCL needs the MPI launcher".into()))?
                .broadcast(0, &mut bytes)
        })?;
        let mut raw = [0 as std::ffi::c_char; 128];
        for (r, b) in raw.iter_mut().zip(&bytes) {
            *r = *b as std::ffi::c_char;
        }
        let c = Rc::new(
            Comm::from_rank(dev.cuda_stream(), rank(), world(), Id::uninit(raw))
                .map_err(nccl_err)?,
        );
        NCCL.with(|n| *n.borrow_mut() = Some(c.clone()));
        Ok(c)
    }

    /// `ncclAllReduce(sum)` of an f32 tensor into a new one, as a custom op (no gradient).
    struct AllReduce(Rc<Comm>);

    impl CustomOp1 for AllReduce {
        fn name(&self) -> &'static str {
            "nccl-all-reduce"
        }
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
        }
        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let dev = s.device.clone();
            let mut dst = dev.alloc_zeros::<f32>(n)?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    pub fn reduce_grads(
        dev: &CudaDevice,
        grads: &mut GradStore,
        vars: &[(String, Var)],
        present: &[f64],
    ) -> Result<()> {
        let comm = comm(dev)?;
        let mut parts = Vec::new();
        let mut sizes = Vec::new();
        for ((_, v), p) in vars.iter().zip(present) {
            let t = v.as_tensor();
            if *p == 0.0 {
                sizes.push(0);
                continue;
            }
            let g = match grads.get(t) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(t.elem_count(), DType::F32, t.device())?,
            };
            sizes.push(t.elem_count());
            parts.push(g);
        }
        if parts.is_empty() {
            return Ok(());
        }
        let flat = Tensor::cat(&parts, 0)?.apply_op1_no_bwd(&AllReduce(comm))?;
        let mut off = 0;
        for ((_, v), n) in vars.iter().zip(sizes) {
            if n == 0 {
                continue;
            }
            let t = v.as_tensor();
            let g = flat
                .narrow(0, off, n)?
                .reshape(t.dims())?
                .to_dtype(t.dtype())?;
            grads.insert(t, g);
            off += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Wire + PartialEq + std::fmt::Debug>(v: &T) -> T {
        let mut b = Vec::new();
        v.put(&mut b);
        let mut rd = b.as_slice();
        let back = T::take(&mut rd).unwrap();
        assert!(rd.is_empty(), "{} bytes left", rd.len());
        back
    }

    #[test]
    fn wire_keeps_every_bit() {
        // floats by bit pattern: NaN payloads, -0, subnormals, the extremes
        let f: Vec<f32> = vec![
            f32::from_bits(0x7fc0_1234),
            -0.0,
            f32::from_bits(1),
            f32::MAX,
            f32::MIN_POSITIVE,
            0.1,
            -3.4028235e38,
        ];
        let back = round_trip(&f);
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let d = vec![
            std::f64::consts::PI,
            f64::from_bits(0x7ff8_0000_0000_0abc),
            -0.0,
        ];
        let back = round_trip(&d);
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            d.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let nested: (Vec<Vec<u32>>, String, usize) = (
            vec![vec![], vec![1, u32::MAX]],
            "é\u{0}x".into(),
            usize::MAX,
        );
        assert_eq!(round_trip(&nested), nested);
        assert_eq!(round_trip(&vec![(); 3]), vec![(); 3]);
    }

    #[test]
    fn a_cut_message_is_an_error_not_a_panic() {
        let mut b = Vec::new();
        (vec![1u32, 2, 3], String::from("abc")).put(&mut b);
        for cut in 0..b.len() {
            let mut rd = &b[..cut];
            assert!(<(Vec<u32>, String)>::take(&mut rd).is_err(), "cut at {cut}");
        }
        // a huge length reads as "ended early", without allocating it
        let mut b = Vec::new();
        (u64::MAX).put(&mut b);
        let mut rd = b.as_slice();
        assert!(Vec::<u8>::take(&mut rd).is_err());
    }

    #[test]
    fn one_process_maps_the_chunks_in_order() {
        let v = shard_map(5, |k| Ok(k * 10)).unwrap();
        assert_eq!(v, vec![0, 10, 20, 30, 40]);
        assert!(shard_map(3, |k| if k == 1 {
            Err(Error::Msg("x".into()))
        } else {
            Ok(k)
        })
        .is_err());
    }
}
