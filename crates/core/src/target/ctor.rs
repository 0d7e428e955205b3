//! Building targets: constructor arguments, device lookup and the registry of target types.
//! All of it runs on the control plane (the thread that loads a table), never on a reactor.

use super::Target;
use crate::limits::Limits;
use crate::{DevId, Sector};
use std::collections::BTreeMap;

use super::DevRef;

/// A constructor argument was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgError {
    /// The field, as dm-target documentation names it (`chunk_size`, `device`, `#stripes`...).
    pub field: String,
    pub reason: String,
}

impl ArgError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> ArgError {
        ArgError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Device facts a constructor needs.
#[derive(Clone, Debug)]
pub struct DevInfo {
    pub id: DevId,
    pub size: Sector,
    pub limits: Limits,
    /// The leaf itself when the device is a leaf (None for volumes): a path checker probes it
    /// with `Leaf::probe`, and request-based targets accept only leaves.
    pub leaf: Option<std::sync::Arc<dyn crate::leaf::Leaf>>,
}

/// Resolves device names while a table is built.
pub trait DeviceLookup {
    fn lookup(&self, name: &str) -> Option<DevInfo>;
    fn lookup_id(&self, id: DevId) -> Option<DevInfo>;
    /// True if `from` is `to` or depends on it through tables: mapping onto `from` from
    /// volume `to` would make a cycle.
    fn reaches(&self, from: DevId, to: DevId) -> bool;
    /// A number unique in the process to the set of devices `DevId`s index (one engine), for
    /// targets that share state between tables keyed by device (a snapshot finds its origin).
    /// 0 when there is no such set.
    fn namespace(&self) -> u64 {
        0
    }
}

/// What a target constructor gets.
pub struct CtorCx<'a> {
    pub start: Sector,
    pub len: Sector,
    /// The volume being loaded (None while checking a table outside any volume).
    pub(crate) this: Option<(DevId, &'a str)>,
    pub(crate) lookup: &'a dyn DeviceLookup,
}

impl<'a> CtorCx<'a> {
    pub fn new(
        start: Sector,
        len: Sector,
        this: Option<(DevId, &'a str)>,
        lookup: &'a dyn DeviceLookup,
    ) -> Self {
        CtorCx {
            start,
            len,
            this,
            lookup,
        }
    }

    /// The namespace of the devices this table is built over: see [`DeviceLookup::namespace`].
    pub fn namespace(&self) -> u64 {
        self.lookup.namespace()
    }

    /// The volume being loaded, if any (id and name).
    pub fn this(&self) -> Option<(DevId, &str)> {
        self.this
    }

    /// Resolves device `name` (argument `field`) and checks that `[offset, offset + len)` lies on it.
    pub fn device(
        &self,
        field: &str,
        name: &str,
        offset: Sector,
        len: Sector,
    ) -> Result<(DevRef, DevInfo), ArgError> {
        if let Some((_, my_name)) = self.this {
            if name == my_name {
                return Err(ArgError::new(
                    field,
                    format!("volume '{my_name}' would stack on itself"),
                ));
            }
        }
        let info = self
            .lookup
            .lookup(name)
            .ok_or_else(|| ArgError::new(field, format!("unknown device '{name}'")))?;
        if let Some((me, my_name)) = self.this {
            if self.lookup.reaches(info.id, me) {
                return Err(ArgError::new(
                    field,
                    format!("volume '{my_name}' would stack on itself through '{name}'"),
                ));
            }
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| ArgError::new(field, "range overflows"))?;
        if end > info.size {
            return Err(ArgError::new(
                field,
                format!(
                    "range {offset}+{len} passes the end of device '{name}' ({} sectors)",
                    info.size
                ),
            ));
        }
        let lbs = info.limits.logical_block_sectors() as u64;
        if !offset.is_multiple_of(lbs) {
            return Err(ArgError::new(
                field,
                format!(
                    "offset {offset} is not a multiple of '{name}' logical block ({lbs} sectors)"
                ),
            ));
        }
        Ok((
            DevRef {
                id: info.id,
                name: name.to_string(),
            },
            info,
        ))
    }
}

/// Parses an unsigned number argument.
pub fn parse_num<T: std::str::FromStr>(field: &str, s: &str) -> Result<T, ArgError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArgError::new(
            field,
            format!("'{s}' is not a non-negative integer"),
        ));
    }
    s.parse()
        .map_err(|_| ArgError::new(field, format!("'{s}' is out of range")))
}

/// Checks an argument count.
pub fn expect_args(args: &[&str], n: usize, usage: &str) -> Result<(), ArgError> {
    if args.len() != n {
        return Err(ArgError::new(
            "arguments",
            format!("expected {n} arguments ({usage}), got {}", args.len()),
        ));
    }
    Ok(())
}

/// A target constructor.
pub type CtorFn = fn(&CtorCx<'_>, &[&str]) -> Result<Box<dyn Target>, ArgError>;

/// The known target types.
#[derive(Default, Clone)]
pub struct TargetRegistry {
    ctors: BTreeMap<&'static str, CtorFn>,
}

impl TargetRegistry {
    pub fn new() -> TargetRegistry {
        TargetRegistry::default()
    }

    pub fn register(&mut self, kind: &'static str, ctor: CtorFn) {
        self.ctors.insert(kind, ctor);
    }

    pub fn get(&self, kind: &str) -> Option<CtorFn> {
        self.ctors.get(kind).copied()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ctors.keys().copied()
    }
}
