//! ONNX Runtime through its C API, loaded at run time from the `libonnxruntime.so.*` that the
//! onnxruntime Python wheel ships (`onnxruntime/capi/`).
//!
//! `OrtGetApiBase()->GetApi(ORT_API_VERSION)` returns a table of function pointers, `struct OrtApi`
//! in `include/onnxruntime/core/session/onnxruntime_c_api.h`. The table only ever grows at the
//! end, so declaring its first entries in header order is enough; entries we do not call are
//! kept as placeholders so the offsets stay right (checked by a test).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use crate::sliding_window::Network;

/// The C API version we request: ONNX Runtime 1.16 or newer provides it.
pub const ORT_API_VERSION: u32 = 16;

type Status = *mut c_void; // OrtStatus*; null means success
type Unused = Option<unsafe extern "C" fn()>;

#[repr(C)]
struct OrtApiBase {
    get_api: unsafe extern "C" fn(version: u32) -> *const OrtApi,
    get_version_string: unsafe extern "C" fn() -> *const c_char,
}

/// `struct OrtApi`, entries 0..=100 in header order.
#[repr(C)]
#[allow(non_snake_case, dead_code)]
struct OrtApi {
    CreateStatus: Unused,
    GetErrorCode: unsafe extern "C" fn(status: *const c_void) -> c_int,
    GetErrorMessage: unsafe extern "C" fn(status: *const c_void) -> *const c_char,
    CreateEnv: unsafe extern "C" fn(log_severity_level: c_int, logid: *const c_char, out: *mut *mut c_void) -> Status,
    CreateEnvWithCustomLogger: Unused,
    EnableTelemetryEvents: Unused,
    DisableTelemetryEvents: unsafe extern "C" fn(env: *const c_void) -> Status,
    CreateSession:
        unsafe extern "C" fn(env: *const c_void, model_path: *const c_char, options: *const c_void, out: *mut *mut c_void) -> Status,
    CreateSessionFromArray: Unused,
    Run: unsafe extern "C" fn(
        session: *mut c_void,
        run_options: *const c_void,
        input_names: *const *const c_char,
        inputs: *const *const c_void,
        input_len: usize,
        output_names: *const *const c_char,
        output_names_len: usize,
        outputs: *mut *mut c_void,
    ) -> Status,
    CreateSessionOptions: unsafe extern "C" fn(out: *mut *mut c_void) -> Status,
    SetOptimizedModelFilePath: Unused,
    CloneSessionOptions: Unused,
    SetSessionExecutionMode: Unused,
    EnableProfiling: Unused,
    DisableProfiling: Unused,
    EnableMemPattern: Unused,
    DisableMemPattern: Unused,
    EnableCpuMemArena: Unused,
    DisableCpuMemArena: Unused,
    SetSessionLogId: Unused,
    SetSessionLogVerbosityLevel: Unused,
    SetSessionLogSeverityLevel: Unused,
    SetSessionGraphOptimizationLevel: unsafe extern "C" fn(options: *mut c_void, level: c_int) -> Status,
    SetIntraOpNumThreads: unsafe extern "C" fn(options: *mut c_void, n: c_int) -> Status,
    SetInterOpNumThreads: unsafe extern "C" fn(options: *mut c_void, n: c_int) -> Status,
    CreateCustomOpDomain: Unused,
    CustomOpDomain_Add: Unused,
    AddCustomOpDomain: Unused,
    RegisterCustomOpsLibrary: Unused,
    SessionGetInputCount: unsafe extern "C" fn(session: *const c_void, out: *mut usize) -> Status,
    SessionGetOutputCount: unsafe extern "C" fn(session: *const c_void, out: *mut usize) -> Status,
    SessionGetOverridableInitializerCount: Unused,
    SessionGetInputTypeInfo: unsafe extern "C" fn(session: *const c_void, index: usize, out: *mut *mut c_void) -> Status,
    SessionGetOutputTypeInfo: unsafe extern "C" fn(session: *const c_void, index: usize, out: *mut *mut c_void) -> Status,
    SessionGetOverridableInitializerTypeInfo: Unused,
    SessionGetInputName:
        unsafe extern "C" fn(session: *const c_void, index: usize, allocator: *mut c_void, out: *mut *mut c_char) -> Status,
    SessionGetOutputName:
        unsafe extern "C" fn(session: *const c_void, index: usize, allocator: *mut c_void, out: *mut *mut c_char) -> Status,
    SessionGetOverridableInitializerName: Unused,
    CreateRunOptions: Unused,
    RunOptionsSetRunLogVerbosityLevel: Unused,
    RunOptionsSetRunLogSeverityLevel: Unused,
    RunOptionsSetRunTag: Unused,
    RunOptionsGetRunLogVerbosityLevel: Unused,
    RunOptionsGetRunLogSeverityLevel: Unused,
    RunOptionsGetRunTag: Unused,
    RunOptionsSetTerminate: Unused,
    RunOptionsUnsetTerminate: Unused,
    CreateTensorAsOrtValue: Unused,
    CreateTensorWithDataAsOrtValue: unsafe extern "C" fn(
        info: *const c_void,
        p_data: *mut c_void,
        p_data_len: usize,
        shape: *const i64,
        shape_len: usize,
        element_type: c_int,
        out: *mut *mut c_void,
    ) -> Status,
    IsTensor: Unused,
    GetTensorMutableData: Unused,
    FillStringTensor: Unused,
    GetStringTensorDataLength: Unused,
    GetStringTensorContent: Unused,
    CastTypeInfoToTensorInfo: unsafe extern "C" fn(type_info: *const c_void, out: *mut *const c_void) -> Status,
    GetOnnxTypeFromTypeInfo: Unused,
    CreateTensorTypeAndShapeInfo: Unused,
    SetTensorElementType: Unused,
    SetDimensions: Unused,
    GetTensorElementType: unsafe extern "C" fn(info: *const c_void, out: *mut c_int) -> Status,
    GetDimensionsCount: unsafe extern "C" fn(info: *const c_void, out: *mut usize) -> Status,
    GetDimensions: unsafe extern "C" fn(info: *const c_void, dims: *mut i64, len: usize) -> Status,
    GetSymbolicDimensions: Unused,
    GetTensorShapeElementCount: Unused,
    GetTensorTypeAndShape: Unused,
    GetTypeInfo: Unused,
    GetValueType: Unused,
    CreateMemoryInfo: Unused,
    CreateCpuMemoryInfo: unsafe extern "C" fn(alloc_type: c_int, mem_type: c_int, out: *mut *mut c_void) -> Status,
    CompareMemoryInfo: Unused,
    MemoryInfoGetName: Unused,
    MemoryInfoGetId: Unused,
    MemoryInfoGetMemType: Unused,
    MemoryInfoGetType: Unused,
    AllocatorAlloc: Unused,
    AllocatorFree: unsafe extern "C" fn(allocator: *mut c_void, p: *mut c_void) -> Status,
    AllocatorGetInfo: Unused,
    GetAllocatorWithDefaultOptions: unsafe extern "C" fn(out: *mut *mut c_void) -> Status,
    AddFreeDimensionOverride: Unused,
    GetValue: Unused,
    GetValueCount: Unused,
    CreateValue: Unused,
    CreateOpaqueValue: Unused,
    GetOpaqueValue: Unused,
    KernelInfoGetAttribute_float: Unused,
    KernelInfoGetAttribute_int64: Unused,
    KernelInfoGetAttribute_string: Unused,
    KernelContext_GetInputCount: Unused,
    KernelContext_GetOutputCount: Unused,
    KernelContext_GetInput: Unused,
    KernelContext_GetOutput: Unused,
    ReleaseEnv: unsafe extern "C" fn(p: *mut c_void),
    ReleaseStatus: unsafe extern "C" fn(p: *mut c_void),
    ReleaseMemoryInfo: unsafe extern "C" fn(p: *mut c_void),
    ReleaseSession: unsafe extern "C" fn(p: *mut c_void),
    ReleaseValue: unsafe extern "C" fn(p: *mut c_void),
    ReleaseRunOptions: Unused,
    ReleaseTypeInfo: unsafe extern "C" fn(p: *mut c_void),
    ReleaseTensorTypeAndShapeInfo: Unused,
    ReleaseSessionOptions: unsafe extern "C" fn(p: *mut c_void),
}

const ORT_LOGGING_LEVEL_WARNING: c_int = 2;
const ORT_ENABLE_ALL: c_int = 99;
const ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: c_int = 1;
const ORT_ARENA_ALLOCATOR: c_int = 1;
const ORT_MEM_TYPE_DEFAULT: c_int = 0;

/// The loaded library and its API table.
pub struct Runtime {
    api: &'static OrtApi,
    pub version: String,
    pub path: PathBuf,
    _lib: libloading::Library,
}

impl Runtime {
    pub fn load(path: &Path) -> Result<Arc<Runtime>> {
        // SAFETY: loading ONNX Runtime runs its (well-behaved) static initializers.
        let lib = unsafe { libloading::Library::new(path) }.with_context(|| format!("cannot load ONNX Runtime from {}", path.display()))?;
        // SAFETY: OrtGetApiBase has this signature in every ONNX Runtime release.
        let base = unsafe {
            let get: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> =
                lib.get(b"OrtGetApiBase\0").with_context(|| format!("{} has no OrtGetApiBase", path.display()))?;
            get()
        };
        ensure!(!base.is_null(), "OrtGetApiBase returned null");
        // SAFETY: base points to a static struct inside the library, which we keep loaded.
        let (api, version) = unsafe {
            let version = CStr::from_ptr(((*base).get_version_string)()).to_string_lossy().into_owned();
            let api = ((*base).get_api)(ORT_API_VERSION);
            if api.is_null() {
                bail!("ONNX Runtime {version} at {} does not provide C API version {ORT_API_VERSION}", path.display());
            }
            (&*api, version)
        };
        Ok(Arc::new(Runtime { api, version, path: path.to_path_buf(), _lib: lib }))
    }

    /// Turn an `OrtStatus*` into a Result (releasing the status).
    fn check(&self, status: Status, what: &str) -> Result<()> {
        if status.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status from this API; released exactly once.
        let msg = unsafe {
            let m = CStr::from_ptr((self.api.GetErrorMessage)(status)).to_string_lossy().into_owned();
            (self.api.ReleaseStatus)(status);
            m
        };
        bail!("ONNX Runtime {what}: {msg}")
    }
}

/// One inference session with a fixed `(1, 1, *patch)` float32 input.
pub struct Session {
    rt: Arc<Runtime>,
    env: *mut c_void,
    session: *mut c_void,
    memory_info: *mut c_void,
    input_name: CString,
    output_name: CString,
    input_shape: [i64; 5],
    output_shape: [i64; 5],
}

impl Session {
    /// Create a session for `model` with `threads` intra-op threads (one inter-op thread).
    /// The patch is read from the model's input shape when it is static, else `default_patch`;
    /// likewise the class count from the output shape, else `default_classes`.
    pub fn new(rt: Arc<Runtime>, model: &Path, threads: usize, default_patch: [usize; 3], default_classes: usize) -> Result<Session> {
        let api = rt.api;
        let model_c = CString::new(model.as_os_str().as_encoded_bytes()).context("model path contains a NUL byte")?;
        ensure!(model.is_file(), "model not found: {}", model.display());
        let mut s = Session {
            rt: rt.clone(),
            env: ptr::null_mut(),
            session: ptr::null_mut(),
            memory_info: ptr::null_mut(),
            input_name: CString::default(),
            output_name: CString::default(),
            input_shape: [0; 5],
            output_shape: [0; 5],
        };
        // SAFETY: plain C API calls; every out-pointer is valid; handles are released in Drop.
        unsafe {
            rt.check((api.CreateEnv)(ORT_LOGGING_LEVEL_WARNING, c"totalseg-rust".as_ptr(), &mut s.env), "CreateEnv")?;
            let _ = rt.check((api.DisableTelemetryEvents)(s.env), "DisableTelemetryEvents");
            let mut opts = ptr::null_mut();
            rt.check((api.CreateSessionOptions)(&mut opts), "CreateSessionOptions")?;
            let configured = (|| -> Result<()> {
                rt.check((api.SetIntraOpNumThreads)(opts, threads as c_int), "SetIntraOpNumThreads")?;
                rt.check((api.SetInterOpNumThreads)(opts, 1), "SetInterOpNumThreads")?;
                rt.check((api.SetSessionGraphOptimizationLevel)(opts, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel")?;
                rt.check((api.CreateSession)(s.env, model_c.as_ptr(), opts, &mut s.session), "CreateSession")
            })();
            (api.ReleaseSessionOptions)(opts);
            configured?;
            rt.check((api.CreateCpuMemoryInfo)(ORT_ARENA_ALLOCATOR, ORT_MEM_TYPE_DEFAULT, &mut s.memory_info), "CreateCpuMemoryInfo")?;

            let (mut n_in, mut n_out) = (0usize, 0usize);
            rt.check((api.SessionGetInputCount)(s.session, &mut n_in), "SessionGetInputCount")?;
            rt.check((api.SessionGetOutputCount)(s.session, &mut n_out), "SessionGetOutputCount")?;
            ensure!(n_in == 1 && n_out >= 1, "expected a model with 1 input and at least 1 output, got {n_in} and {n_out}");
            s.input_name = s.name(true)?;
            s.output_name = s.name(false)?;
            let in_dims = s.dims(true)?;
            let out_dims = s.dims(false)?;
            ensure!(in_dims.len() == 5 && out_dims.len() == 5, "expected 5-D input and output, got {in_dims:?} and {out_dims:?}");
            let patch: [usize; 3] = if in_dims[2..].iter().all(|&d| d > 0) {
                [in_dims[2] as usize, in_dims[3] as usize, in_dims[4] as usize]
            } else {
                default_patch
            };
            let classes = if out_dims[1] > 0 { out_dims[1] as usize } else { default_classes };
            let p = patch.map(|v| v as i64);
            s.input_shape = [1, 1, p[0], p[1], p[2]];
            s.output_shape = [1, classes as i64, p[0], p[1], p[2]];
        }
        Ok(s)
    }

    /// Name of input 0 or output 0.
    unsafe fn name(&self, input: bool) -> Result<CString> {
        let api = self.rt.api;
        let mut alloc = ptr::null_mut();
        self.rt.check((api.GetAllocatorWithDefaultOptions)(&mut alloc), "GetAllocatorWithDefaultOptions")?;
        let mut raw: *mut c_char = ptr::null_mut();
        let st = if input {
            (api.SessionGetInputName)(self.session, 0, alloc, &mut raw)
        } else {
            (api.SessionGetOutputName)(self.session, 0, alloc, &mut raw)
        };
        self.rt.check(st, "SessionGetInputName/OutputName")?;
        let name = CStr::from_ptr(raw).to_owned();
        self.rt.check((api.AllocatorFree)(alloc, raw as *mut c_void), "AllocatorFree")?;
        Ok(name)
    }

    /// Declared dimensions (-1 for dynamic) of input 0 or output 0; must be float32.
    unsafe fn dims(&self, input: bool) -> Result<Vec<i64>> {
        let api = self.rt.api;
        let mut type_info = ptr::null_mut();
        let st = if input {
            (api.SessionGetInputTypeInfo)(self.session, 0, &mut type_info)
        } else {
            (api.SessionGetOutputTypeInfo)(self.session, 0, &mut type_info)
        };
        self.rt.check(st, "SessionGetInputTypeInfo")?;
        let result = (|| -> Result<Vec<i64>> {
            let mut info: *const c_void = ptr::null();
            self.rt.check((api.CastTypeInfoToTensorInfo)(type_info, &mut info), "CastTypeInfoToTensorInfo")?;
            ensure!(!info.is_null(), "model input/output is not a tensor");
            let mut elem: c_int = 0;
            self.rt.check((api.GetTensorElementType)(info, &mut elem), "GetTensorElementType")?;
            ensure!(elem == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "model input/output must be float32 (element type {elem})");
            let mut n = 0usize;
            self.rt.check((api.GetDimensionsCount)(info, &mut n), "GetDimensionsCount")?;
            let mut dims = vec![0i64; n];
            self.rt.check((api.GetDimensions)(info, dims.as_mut_ptr(), n), "GetDimensions")?;
            Ok(dims)
        })();
        (api.ReleaseTypeInfo)(type_info);
        result
    }

    pub fn input_name(&self) -> &str {
        self.input_name.to_str().unwrap_or("?")
    }

    unsafe fn tensor(&self, data: *mut f32, len: usize, shape: &[i64; 5]) -> Result<*mut c_void> {
        let mut v = ptr::null_mut();
        let st = (self.rt.api.CreateTensorWithDataAsOrtValue)(
            self.memory_info,
            data as *mut c_void,
            len * std::mem::size_of::<f32>(),
            shape.as_ptr(),
            5,
            ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
            &mut v,
        );
        self.rt.check(st, "CreateTensorWithDataAsOrtValue")?;
        Ok(v)
    }
}

impl Network for Session {
    fn patch(&self) -> [usize; 3] {
        [self.input_shape[2] as usize, self.input_shape[3] as usize, self.input_shape[4] as usize]
    }

    fn n_classes(&self) -> usize {
        self.output_shape[1] as usize
    }

    /// Run one tile; ONNX Runtime writes the logits straight into `output` (pre-allocated).
    fn predict(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let n_in: usize = self.input_shape.iter().product::<i64>() as usize;
        let n_out: usize = self.output_shape.iter().product::<i64>() as usize;
        ensure!(input.len() == n_in && output.len() == n_out, "tile buffers do not match the model shapes");
        let api = self.rt.api;
        // SAFETY: the OrtValues borrow `input`/`output` only for the duration of Run; ORT does not
        // write to inputs, so casting away const is sound.
        unsafe {
            let x = self.tensor(input.as_ptr() as *mut f32, n_in, &self.input_shape)?;
            let y = match self.tensor(output.as_mut_ptr(), n_out, &self.output_shape) {
                Ok(y) => y,
                Err(e) => {
                    (api.ReleaseValue)(x);
                    return Err(e);
                }
            };
            let mut outputs = [y];
            let st = (api.Run)(
                self.session,
                ptr::null(),
                [self.input_name.as_ptr()].as_ptr(),
                [x as *const c_void].as_ptr(),
                1,
                [self.output_name.as_ptr()].as_ptr(),
                1,
                outputs.as_mut_ptr(),
            );
            (api.ReleaseValue)(x);
            (api.ReleaseValue)(outputs[0]);
            self.rt.check(st, "Run")
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let api = self.rt.api;
        // SAFETY: each handle was created by this API and is released once.
        unsafe {
            if !self.memory_info.is_null() {
                (api.ReleaseMemoryInfo)(self.memory_info);
            }
            if !self.session.is_null() {
                (api.ReleaseSession)(self.session);
            }
            if !self.env.is_null() {
                (api.ReleaseEnv)(self.env);
            }
        }
    }
}

/// Find `libonnxruntime.so*`: the explicit path, else `$TSBENCH_ORT_LIB`, else the `capi/` folder
/// of the onnxruntime package of the active Python (`$VIRTUAL_ENV`, the repository's `.venv`,
/// then `python3` on PATH).
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("TSBENCH_ORT_LIB").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut pythons: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        pythons.push(Path::new(&venv).join("bin/python"));
    }
    pythons.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    pythons.push(PathBuf::from("python3"));
    let probe = "import importlib.util as u; s = u.find_spec('onnxruntime'); print(s.submodule_search_locations[0] if s else '')";
    for py in pythons {
        let Ok(out) = Command::new(&py).args(["-c", probe]).output() else { continue };
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dir.is_empty() {
            continue;
        }
        if let Some(lib) = library_in(&Path::new(&dir).join("capi")) {
            return Ok(lib);
        }
    }
    bail!("libonnxruntime.so not found: install the onnxruntime Python package, or pass --ort-lib / set TSBENCH_ORT_LIB")
}

fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
        .collect();
    libs.sort();
    libs.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_table_layout_matches_the_header() {
        let slot = std::mem::size_of::<usize>();
        assert_eq!(std::mem::offset_of!(OrtApi, Run), 9 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, SetIntraOpNumThreads), 24 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, SessionGetInputName), 36 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, CreateTensorWithDataAsOrtValue), 49 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, CreateCpuMemoryInfo), 69 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, GetAllocatorWithDefaultOptions), 78 * slot);
        assert_eq!(std::mem::offset_of!(OrtApi, ReleaseEnv), 92 * slot);
        assert_eq!(std::mem::size_of::<OrtApi>(), 101 * slot);
    }

    /// The library the benchmark uses provides the API version we request. Skipped (with a
    /// message) when no onnxruntime is installed, unless TSBENCH_REQUIRE_ORT=1.
    #[test]
    fn requested_api_version_exists() {
        let path = match find_library(None) {
            Ok(p) => p,
            Err(e) if std::env::var("TSBENCH_REQUIRE_ORT").as_deref() != Ok("1") => {
                eprintln!("SKIPPED requested_api_version_exists: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let rt = Runtime::load(&path).unwrap();
        assert!(!rt.version.is_empty());
        // a version far in the future must be refused, proving the check is real
        // SAFETY: as in Runtime::load.
        let future = unsafe {
            let lib = libloading::Library::new(&path).unwrap();
            let get: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> = lib.get(b"OrtGetApiBase\0").unwrap();
            ((*get()).get_api)(10_000).is_null()
        };
        assert!(future, "GetApi(10000) should return null");
        eprintln!("ONNX Runtime {} at {} provides API {ORT_API_VERSION}", rt.version, path.display());
    }
}
