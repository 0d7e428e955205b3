//! `zero`: reads return zeros, writes are dropped (like /dev/zero).

use stackbd_core::target::{expect_args, TargetExtent};
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, Limits, MapResult, Op, Sector, Status, Target, TargetCx,
};

#[derive(Debug)]
pub struct Zero;

impl Zero {
    pub fn ctor(_cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        expect_args(args, 0, "no arguments")?;
        Ok(Box::new(Zero))
    }
}

impl Target for Zero {
    fn kind(&self) -> &'static str {
        "zero"
    }

    fn map(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> MapResult {
        if bio.op == Op::Read {
            bio.data.fill_zero();
        }
        MapResult::Done(Status::Ok)
    }

    fn limits(&self, _child: &dyn Fn(DevId) -> Limits) -> Limits {
        Limits::TOP
    }

    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Zero { len }
    }

    fn devices(&self) -> Vec<DevId> {
        Vec::new()
    }

    fn args(&self) -> String {
        String::new()
    }
}
