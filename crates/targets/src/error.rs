//! `error`: every I/O fails (flushes skip it, as in dm, since it has no device to flush).

use stackbd_core::target::expect_args;
use stackbd_core::{ArgError, Bio, CtorCx, DevId, Limits, MapResult, Status, Target, TargetCx};

#[derive(Debug)]
pub struct Error;

impl Error {
    pub fn ctor(_cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 0, "no arguments")?;
        Ok(Box::new(Error))
    }
}

impl Target for Error {
    fn kind(&self) -> &'static str {
        "error"
    }

    fn map(&self, _bio: &mut Bio, _cx: &mut TargetCx<'_>) -> MapResult {
        MapResult::Done(Status::IoError)
    }

    fn limits(&self, _child: &dyn Fn(DevId) -> Limits) -> Limits {
        Limits::TOP
    }

    fn devices(&self) -> Vec<DevId> {
        Vec::new()
    }

    fn args(&self) -> String {
        String::new()
    }
}
