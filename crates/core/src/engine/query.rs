//! What the control plane asks of an engine without changing it: `info`, `table`, `status`,
//! `deps`, `ls`, `ls --tree`, device lookups; and `message`, `wait` and `events`.

use super::*;

impl Engine {
    pub fn info(&self, name: &str) -> Result<VolumeInfo, EngineError> {
        let (id, v) = self.volume(name)?;
        Ok(VolumeInfo {
            name: v.name.clone(),
            dev: id,
            suspended: v.suspended.is_some(),
            suspending: Engine::suspending_info(v),
            suspend_deadline: Engine::deadline_left(v),
            live_table: v.active.is_some(),
            inactive_table: v.inactive.is_some(),
            open_count: v.open_count,
            event_nr: v.events.nr(),
            size: v.active.as_ref().map_or(0, |t| t.size()),
            targets: v.active.as_ref().map_or(0, |t| t.entries().len()),
        })
    }

    /// The live (or inactive) table as canonical text.
    pub fn table(&self, name: &str, inactive: bool) -> Result<String, EngineError> {
        let (_, v) = self.volume(name)?;
        let t = if inactive { &v.inactive } else { &v.active };
        Ok(t.as_ref().map(|t| t.to_string()).unwrap_or_default())
    }

    pub fn live_table(&self, name: &str) -> Result<Option<Arc<Table>>, EngineError> {
        Ok(self.volume(name)?.1.active.clone())
    }

    pub fn status(&self, name: &str) -> Result<String, EngineError> {
        let (_, v) = self.volume(name)?;
        Ok(v.active
            .as_ref()
            .map(|t| t.status_text())
            .unwrap_or_default())
    }

    /// `dmsetup message NAME SECTOR MSG...`: to the target holding `sector`.
    pub fn message(
        &mut self,
        name: &str,
        sector: Sector,
        argv: &[&str],
    ) -> Result<String, EngineError> {
        let (_, v) = self.volume(name)?;
        let t = v
            .active
            .as_ref()
            .ok_or_else(|| EngineError::invalid(name, "no live table"))?;
        if sector >= t.size() {
            return Err(EngineError::invalid(
                name,
                format!("sector {sector} is past the end ({})", t.size()),
            ));
        }
        let e = &t.entries()[t.find(sector)];
        e.target
            .message(argv)
            .map_err(|r| EngineError::invalid(name, r))
    }

    /// Names of the devices a volume's live table maps onto.
    pub fn deps(&self, name: &str) -> Result<Vec<String>, EngineError> {
        let (_, v) = self.volume(name)?;
        Ok(v.active
            .iter()
            .flat_map(|t| t.devices())
            .filter_map(|d| self.dev_name(d).map(str::to_string))
            .collect())
    }

    /// Blocks until the volume's event counter passes `event_nr` (or the timeout); returns it.
    pub fn wait(
        &mut self,
        name: &str,
        event_nr: u64,
        timeout: Duration,
    ) -> Result<u64, EngineError> {
        let (_, v) = self.volume(name)?;
        let ev = v.events.clone();
        let start = Instant::now();
        while ev.nr() <= event_nr && start.elapsed() < timeout {
            if self.poll() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(ev.nr())
    }

    pub fn events(&self, name: &str) -> Result<Arc<Events>, EngineError> {
        Ok(self.volume(name)?.1.events.clone())
    }

    /// Names of all devices: (name, is_volume).
    pub fn ls(&self) -> Vec<(String, bool)> {
        self.names
            .iter()
            .map(|(n, id)| {
                (
                    n.clone(),
                    matches!(self.devs[id.0 as usize], DevEntry::Volume(_)),
                )
            })
            .collect()
    }

    /// Leaves by name.
    pub fn leaf(&self, name: &str) -> Result<Arc<dyn Leaf>, EngineError> {
        match &self.devs[self.dev_id(name)?.0 as usize] {
            DevEntry::Leaf(l) => Ok(l.leaf.clone()),
            _ => Err(EngineError::invalid(name, "is a volume, not a leaf")),
        }
    }

    /// `ls --tree`: each top volume and what it stacks on, indented.
    pub fn tree(&self) -> String {
        let mut out = String::new();
        let used: Vec<DevId> = self
            .devs
            .iter()
            .enumerate()
            .flat_map(|(i, _)| self.lookup().children(DevId(i as u32)))
            .collect();
        for (name, id) in &self.names {
            if !used.contains(id) {
                self.tree_node(*id, 0, &mut out);
            }
            let _ = name;
        }
        out
    }

    fn tree_node(&self, id: DevId, depth: usize, out: &mut String) {
        let name = self.dev_name(id).unwrap_or("?");
        let kind = match &self.devs[id.0 as usize] {
            DevEntry::Leaf(l) => l.leaf.kind(),
            _ => "volume",
        };
        out.push_str(&format!("{}{} ({kind})\n", "  ".repeat(depth), name));
        if depth < crate::bio::MAX_FRAMES {
            for c in self.lookup().children(id) {
                self.tree_node(c, depth + 1, out);
            }
        }
    }

    /// Size and limits of any device.
    pub fn dev_info(&self, name: &str) -> Result<DevInfo, EngineError> {
        self.lookup()
            .lookup(name)
            .ok_or_else(|| EngineError::NoDevice(name.to_string()))
    }
}
