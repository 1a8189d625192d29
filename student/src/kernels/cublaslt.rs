//! cuBLASLt products on Burn's CUDA tensors.
//!
//! Why by hand: no crate multiplies CubeCL's buffers with cuBLAS. cudarc (the binding cubecl-cuda
//! itself uses) gives the raw cuBLASLt calls, loaded at run time, so nothing here needs a CUDA
//! toolkit to build. Each product is enqueued on the stream CubeCL orders this thread's kernels
//! on (exposed by the one-field patch in `vendor/cubecl-cuda`), so it runs between the kernels
//! before and after it with no host synchronisation, and the buffers it reads and writes are
//! reused by CubeCL's pool only after it, in stream order.
//!
//! Burn is row-major and cuBLAS column-major: `D = L·R` is computed as `Dᵀ = Rᵀ·Lᵀ`, where a
//! row-major operand is, read column-major, already its own transpose, and a transposed view
//! (unit stride on the row axis, as `swap_dims` leaves it) becomes `op = T` with no copy. Leading
//! dimensions that collapse to one stride become cuBLASLt's strided batch; anything else is made
//! contiguous first.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use burn::tensor::DType;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::result as driver;
use cudarc::driver::sys::CUcontext;

use super::layout::{Layout, alignment, matrix_layout};

type Cuda = CubeTensor<CudaRuntime>;

/// NVIDIA's advice for Hopper; smaller GPUs use less of it.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Whether the cuBLASLt library can be loaded, or why not: checked before a CUDA run starts, so
/// a missing library is an error naming it instead of a panic inside the first product.
pub fn preflight() -> Result<(), String> {
    // SAFETY: only tries to dlopen the candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(format!(
            "cuBLASLt (libcublasLt.so) could not be loaded: the CUDA products need it. Install \
             NVIDIA's cuBLAS (PyTorch's wheels ship it under site-packages/nvidia/cublas/lib) and \
             put its folder on LD_LIBRARY_PATH, or set DISTILL_GEMM=cubecl to use Burn's own \
             kernels. Names tried: {:?}",
            cudarc::get_lib_name_candidates("cublasLt")
        ))
    }
}

/// `lhs·rhs`, `[.., m, k]·[.., k, n]` with equal leading dimensions, in the inputs' dtype
/// (f32 accumulation; f32 inputs use TF32 only when `tf32`). Other dtypes, and broadcast
/// leading dimensions, take Burn's matmul.
pub fn matmul(lhs: Cuda, rhs: Cuda, tf32: bool) -> Cuda {
    use burn::tensor::ops::FloatTensorOps;
    let dtype = lhs.dtype;
    let data_type = match dtype {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        _ => return crate::CudaBackend::float_matmul(lhs, rhs),
    };
    assert_eq!(
        rhs.dtype, dtype,
        "cuBLASLt product of {dtype:?} by {:?}",
        rhs.dtype
    );
    // Kept (two handle clones) for a product cuBLASLt has no algorithm for.
    let (lhs0, rhs0) = (lhs.clone(), rhs.clone());
    let ls = lhs.meta.shape().clone();
    let rank = ls.num_dims();
    // Broadcast batch dimensions are Burn's to handle (no caller sends them today).
    let rs = rhs.meta.shape();
    if rank < 2 || rs.num_dims() != rank || rs[..rank - 2] != ls[..rank - 2] {
        return crate::CudaBackend::float_matmul(lhs, rhs);
    }
    let (m, k, n) = (ls[rank - 2], ls[rank - 1], rhs.meta.shape()[rank - 1]);
    assert_eq!(
        rhs.meta.shape()[rank - 2],
        k,
        "inner dimensions of the product"
    );
    let batch: usize = ls[..rank - 2].iter().product();
    let mut out_dims = ls.to_vec();
    out_dims[rank - 1] = n;
    let out = empty_device_contiguous_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(out_dims),
        dtype,
    );
    if m == 0 || n == 0 || batch == 0 {
        return out;
    }
    // The first cuBLAS operand is `Rᵀ` (n × k), the second `Lᵀ` (k × m).
    let (rhs, a) = operand(rhs, batch);
    let (lhs, b) = operand(lhs, batch);
    let d = Layout {
        trans: false,
        rows: n as u64,
        cols: m as u64,
        ld: n as i64,
        batch: batch as i32,
        stride: (m * n) as i64,
    };
    let client = out.client.clone();
    let (ra, rb, rd) = (
        client
            .get_resource(rhs.handle.clone())
            .expect("cuBLASLt operand"),
        client
            .get_resource(lhs.handle.clone())
            .expect("cuBLASLt operand"),
        client
            .get_resource(out.handle.clone())
            .expect("cuBLASLt output"),
    );
    let (pa, pb, pd) = (ra.resource().ptr, rb.resource().ptr, rd.resource().ptr);
    let stream = rd.resource().stream;
    assert!(
        !stream.is_null(),
        "cubecl-cuda without distill's stream patch"
    );
    let key = Key {
        data_type,
        tf32: tf32 && dtype == DType::F32,
        a,
        b,
        d,
        align: [alignment(pa), alignment(pb), alignment(pd)],
    };
    let device = out.device.index;
    let done = with_state(device, |state| {
        let (handle, workspace) = (state.handle, state.workspace);
        let Some(plan) = state.plan(&key) else {
            return false;
        };
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the pointers are live CubeCL buffers (held by the resource guards until this
        // call is enqueued), of the sizes the layouts describe; the stream is CubeCL's stream
        // for this thread, in the primary context this thread has current.
        unsafe {
            lt::matmul(
                handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                pa as *const c_void,
                plan.a,
                pb as *const c_void,
                plan.b,
                pd as *const c_void,
                plan.d,
                pd as *mut c_void,
                plan.d,
                &plan.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream as sys::cudaStream_t,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLASLt matmul {key:?}: {e}"));
        true
    });
    drop((ra, rb, rd, rhs, lhs));
    if done {
        out
    } else {
        crate::CudaBackend::float_matmul(lhs0, rhs0)
    }
}

/// `x [.., r, c]` as the column-major operand `xᵀ` (`c × r`), made contiguous first when its
/// strides fit neither a row-major nor a transposed matrix, or its batch has no single stride.
fn operand(x: Cuda, batch: usize) -> (Cuda, Layout) {
    let layout_of = |x: &Cuda| matrix_layout(x.meta.shape(), x.meta.strides(), batch);
    if let Some(layout) = layout_of(&x) {
        return (x, layout);
    }
    let x = into_contiguous(x);
    let layout = layout_of(&x).expect("a contiguous tensor has a cuBLASLt layout");
    (x, layout)
}

/// What decides a product's descriptors and algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    data_type: sys::cudaDataType,
    tf32: bool,
    a: Layout,
    b: Layout,
    d: Layout,
    align: [u32; 3],
}

/// Descriptors and the heuristic's algorithm for one [`Key`], made once and kept: training
/// repeats the same few dozen shapes every step.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// Per thread and device: the handle, the workspace and the plans (cuBLASLt handles and a
/// workspace in use must not be shared between concurrent streams; each thread has its own).
struct State {
    /// The device's primary context: the one cubecl-cuda retains, so pointers are shared.
    ctx: CUcontext,
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    /// `None`: cuBLASLt has no algorithm for this key; CubeCL multiplies it.
    plans: HashMap<Key, Option<Plan>>,
}

thread_local! {
    static STATES: RefCell<HashMap<usize, State>> = RefCell::new(HashMap::new());
}

fn with_state<R>(device: usize, f: impl FnOnce(&mut State) -> R) -> R {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = states.entry(device).or_insert_with(|| State::new(device));
        // SAFETY: a retained primary context stays valid for the process.
        unsafe { driver::ctx::set_current(state.ctx) }
            .unwrap_or_else(|e| panic!("CUDA context of GPU {device}: {e}"));
        f(state)
    })
}

impl State {
    fn new(device: usize) -> Self {
        if let Err(e) = preflight() {
            panic!("{e}");
        }
        // SAFETY: plain driver calls; the context is retained for the life of the process.
        let ctx = unsafe {
            driver::init()
                .and_then(|()| driver::device::get(device as i32))
                .and_then(|dev| driver::primary_ctx::retain(dev))
                .and_then(|ctx| driver::ctx::set_current(ctx).map(|()| ctx))
        }
        .unwrap_or_else(|e| panic!("CUDA primary context of GPU {device}: {e}"));
        let handle = lt::create_handle().unwrap_or_else(|e| panic!("cuBLASLt handle: {e}"));
        // SAFETY: the context is current; the workspace lives as long as the thread (it is
        // used asynchronously by products still in flight, so it is never freed early).
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
            .unwrap_or_else(|e| panic!("cuBLASLt workspace ({WORKSPACE_BYTES} bytes): {e}"));
        Self {
            ctx,
            handle,
            workspace,
            plans: HashMap::new(),
        }
    }

    fn plan(&mut self, key: &Key) -> Option<&Plan> {
        let handle = self.handle;
        self.plans
            .entry(*key)
            .or_insert_with(|| make_plan(handle, key))
            .as_ref()
    }
}

/// The plan of `key`, or `None` (said once on stderr) when the heuristic finds no algorithm.
fn make_plan(handle: sys::cublasLtHandle_t, key: &Key) -> Option<Plan> {
    // SAFETY: every descriptor is created here and only read by cuBLASLt afterwards.
    unsafe {
        let data_type = key.data_type;
        let compute = if key.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let fail =
            |what: &str, e: lt::CublasError| -> ! { panic!("cuBLASLt {what} for {key:?}: {e}") };
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .unwrap_or_else(|e| fail("descriptor", e));
        for (attr, trans) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                key.a.trans,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                key.b.trans,
            ),
        ] {
            let op = trans as i32;
            lt::set_matmul_desc_attribute(
                desc,
                attr,
                &op as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .unwrap_or_else(|e| fail("transpose attribute", e));
        }
        let layout = |l: &Layout| {
            let m = lt::create_matrix_layout(data_type, l.rows, l.cols, l.ld)
                .unwrap_or_else(|e| fail("layout", e));
            if l.batch > 1 {
                lt::set_matrix_layout_attribute(
                    m,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &l.batch as *const i32 as *const c_void,
                    size_of::<i32>(),
                )
                .unwrap_or_else(|e| fail("batch count", e));
                lt::set_matrix_layout_attribute(
                    m,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &l.stride as *const i64 as *const c_void,
                    size_of::<i64>(),
                )
                .unwrap_or_else(|e| fail("batch stride", e));
            }
            m
        };
        let (a, b, d) = (layout(&key.a), layout(&key.b), layout(&key.d));
        let pref = lt::create_matmul_pref().unwrap_or_else(|e| fail("preference", e));
        let bytes = WORKSPACE_BYTES as u64;
        lt::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &bytes as *const u64 as *const c_void,
            size_of::<u64>(),
        )
        .unwrap_or_else(|e| fail("workspace preference", e));
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, align) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
        ] {
            lt::set_matmul_pref_attribute(
                pref,
                attr,
                &align as *const u32 as *const c_void,
                size_of::<u32>(),
            )
            .unwrap_or_else(|e| fail("alignment preference", e));
        }
        let heuristic = lt::get_matmul_algo_heuristic(handle, desc, a, b, d, d, pref);
        lt::destroy_matmul_pref(pref).unwrap_or_else(|e| fail("preference", e));
        match heuristic {
            Ok(h) => Some(Plan {
                desc,
                a,
                b,
                d,
                algo: h.algo,
            }),
            Err(e) => {
                eprintln!(
                    "warning: cuBLASLt has no algorithm for {key:?} ({e}); CubeCL multiplies it"
                );
                // Nothing will use them: the key is remembered as having no plan.
                for layout in [a, b, d] {
                    let _ = lt::destroy_matrix_layout(layout);
                }
                let _ = lt::destroy_matmul_desc(desc);
                None
            }
        }
    }
}
