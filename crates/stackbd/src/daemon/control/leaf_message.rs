//! `leaf_message {name, argv}`: a message to a leaf itself ([`stackbd_core::Leaf::message`]),
//! the leaf analogue of `message` (which goes to a volume's target). The engine lock is held
//! only to find the leaf; the leaf answers outside it, since it may block briefly (a power-cut
//! leaf's `save` writes a file).

use super::{engine, es, Req};
use serde_json::{json, Value};

pub(super) fn leaf_message(d: &super::Daemon, r: &Req<'_>) -> Result<Value, String> {
    let name = r.string("name")?;
    let argv = r.argv("argv")?;
    let leaf = engine(d).leaf(name).map_err(es)?;
    let reply = leaf
        .message(&argv)
        .map_err(|e| format!("leaf '{name}': {e}"))?;
    // A message changes the leaf's state, never the parameters it was built from: the state
    // file stays as it is.
    Ok(json!({ "reply": reply }))
}
