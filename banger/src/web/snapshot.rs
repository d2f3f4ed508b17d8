//! The state a page draws: the model as JSON, limited to what the caller
//! sees by default (their own VMs and jobs; root sees everyone's), as the
//! CLI's `vm list` does.

use std::time::Instant;

use serde_json::{Value, json};

use crate::client::VmInfo;
use crate::live::Model;

/// Whether the web pages of user `me` show `vm`.
pub fn visible(vm: &VmInfo, me: u32) -> bool {
    me == 0 || vm.owner_uid == me
}

/// The model as the pages of user `me` see it, at `now`.
pub fn snapshot(model: &Model, me: u32, now: Instant) -> Value {
    let images = model.images();
    let kernels = model.kernels();
    let all = model.vms();
    let vms: Vec<Value> = all
        .iter()
        .filter(|v| visible(v, me))
        .map(|v| {
            let stats = model.stats(&v.path).filter(|_| v.state == "running");
            json!({
                "id": v.id,
                "name": v.name,
                "state": v.state,
                "ipv4": v.ipv4,
                "mac": v.mac,
                "vcpus": v.vcpus,
                "memory_mib": v.memory_mib,
                "disk_bytes": v.disk_bytes,
                "nat": v.nat,
                "image": model.image_name(&v.image),
                "owner_uid": v.owner_uid,
                "last_error": v.last_error,
                "created_at_usec": v.created_at_usec,
                "cpu_percent": stats.and_then(|s| s.cpu_percent),
                "rss_bytes": stats.map(|s| s.rss_bytes),
                "forwards": v.forwards,
                "mounts": v.mounts,
            })
        })
        .collect();
    let jobs: Vec<Value> = model
        .jobs(now)
        .into_iter()
        .filter(|j| me == 0 || j.owner_uid == me)
        .map(|j| {
            let result_vm = j
                .outcome
                .as_ref()
                .and_then(|o| all.iter().find(|v| v.path == o.result))
                .map(|v| &v.id);
            json!({
                "id": j.label,
                "kind": j.kind,
                "state": j.state,
                "running": j.running(),
                "stage": j.stage,
                "detail": j.detail,
                "fraction": j.fraction,
                "bytes": j.bytes,
                "rate": j.rate,
                "eta_secs": j.eta.map(|d| d.as_secs()),
                "stages": j.stages,
                "outcome": j.outcome.as_ref().map(|o| json!({
                    "success": o.success,
                    "error_name": o.error_name,
                    "message": o.message,
                })),
                "result_vm": result_vm,
            })
        })
        .collect();
    json!({
        "connected": model.connected(),
        "gone": model.gone(),
        "me": me,
        "vms": vms,
        "images": images.iter().map(|i| json!({
            "id": i.id,
            "name": i.name,
            "rootfs_bytes": i.rootfs_bytes,
            "managed": i.managed,
            "kernel": kernels.iter().find(|k| k.path == i.kernel).map(|k| k.name.clone()),
        })).collect::<Vec<_>>(),
        "kernels": kernels.iter().map(|k| json!({
            "id": k.id,
            "name": k.name,
            "version": k.version,
            "size_bytes": k.size_bytes,
        })).collect::<Vec<_>>(),
        "jobs": jobs,
    })
}
