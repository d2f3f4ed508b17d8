//! The model against signal sequences as bangerd sends them: each test
//! builds the very messages (path, interface, member, body signature) a
//! running bangerd emits for a create, a pull, a delete and a restart, and
//! feeds them through [`Update::decode`] and [`Model::apply`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use zbus::{ObjectPath, OwnedVariant, Variant as Value};

use super::*;

const VM: &str = "/org/banger/Manager/vm/0f1e2d3c";
const IMAGE: &str = "/org/banger/Manager/image/aa11";
const JOB: &str = "/org/banger/Manager/job/7";
const SENDER: &str = ":1.42";

fn v<'a>(value: impl Into<Value<'a>>) -> OwnedVariant {
    OwnedVariant::try_from(value.into()).expect("owned")
}

fn vm_props(name: &str, state: &str) -> Props {
    HashMap::from([
        ("Id".to_owned(), v("0f1e2d3c")),
        ("Name".to_owned(), v(name)),
        ("State".to_owned(), v(state)),
        ("OwnerUID".to_owned(), v(1000u32)),
        ("IPv4".to_owned(), v("")),
        ("VCPUs".to_owned(), v(2u32)),
        ("MemoryMiB".to_owned(), v(512u32)),
        ("NAT".to_owned(), v(false)),
        (
            "Image".to_owned(),
            v(ObjectPath::try_from(IMAGE).expect("path")),
        ),
    ])
}

fn job_props(kind: &str) -> Props {
    HashMap::from([
        ("Kind".to_owned(), v(kind)),
        ("State".to_owned(), v("running")),
        ("Stage".to_owned(), v("")),
        ("Progress".to_owned(), v(0.0f64)),
        ("Bytes".to_owned(), v(0u64)),
        ("OwnerUID".to_owned(), v(1000u32)),
        ("StartedAt".to_owned(), v(1_700_000_000_000_000u64)),
        ("Cancelable".to_owned(), v(true)),
        ("Stages".to_owned(), v(Vec::<(String, u64)>::new())),
    ])
}

fn signal<B>(path: &str, interface: &str, member: &str, body: &B) -> Message
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    Message::signal(path, interface, member)
        .sender(SENDER)
        .build(body)
        .expect("message")
}

fn added(path: &str, interface: &str, props: Props) -> Message {
    let path_value = ObjectPath::try_from(path).expect("path");
    let interfaces = HashMap::from([(interface.to_owned(), props)]);
    signal(
        "/org/banger/Manager",
        OBJECT_MANAGER,
        "InterfacesAdded",
        &(path_value, interfaces),
    )
}

fn removed(path: &str, interface: &str) -> Message {
    let path_value = ObjectPath::try_from(path).expect("path");
    signal(
        "/org/banger/Manager",
        OBJECT_MANAGER,
        "InterfacesRemoved",
        &(path_value, vec![interface.to_owned()]),
    )
}

fn changed(path: &str, interface: &str, props: Props) -> Message {
    signal(
        path,
        PROPERTIES,
        "PropertiesChanged",
        &(interface, props, Vec::<String>::new()),
    )
}

fn progress(stage: &str, detail: &str, fraction: f64) -> Message {
    signal(JOB, JOB_INTERFACE, "Progress", &(stage, detail, fraction))
}

fn apply_all(model: &mut Model, messages: Vec<Message>, start: Instant, step: Duration) {
    for (i, msg) in messages.into_iter().enumerate() {
        let update = Update::decode(&msg)
            .expect("decodes")
            .expect("a signal the model uses");
        model.apply(update, start + step * u32::try_from(i).expect("small"));
    }
}

fn loaded(objects: Vec<(&str, &str, Props)>) -> Update {
    Update::Loaded(
        objects
            .into_iter()
            .map(|(path, interface, props)| {
                (
                    path.to_owned(),
                    Interfaces::from([(interface.to_owned(), props)]),
                )
            })
            .collect(),
    )
}

fn image_props() -> Props {
    HashMap::from([("Id".to_owned(), v("aa11")), ("Name".to_owned(), v("tiny"))])
}

#[test]
fn a_create_seen_from_its_signals() {
    let start = Instant::now();
    let mut model = Model::default();
    assert!(!model.connected());
    model.apply(loaded(vec![(IMAGE, IMAGE_INTERFACE, image_props())]), start);
    assert!(model.connected());
    assert!(model.vms().is_empty());

    apply_all(
        &mut model,
        vec![
            added(VM, VM_INTERFACE, vm_props("web", "creating")),
            added(JOB, JOB_INTERFACE, job_props("vm.create")),
            progress("disks", "", 0.1),
            changed(
                JOB,
                JOB_INTERFACE,
                HashMap::from([
                    ("Stage".to_owned(), v("disks")),
                    ("Progress".to_owned(), v(0.1f64)),
                    ("Bytes".to_owned(), v(0u64)),
                ]),
            ),
            progress("disks", "copying the work seed", 0.3),
            changed(
                JOB,
                JOB_INTERFACE,
                HashMap::from([
                    ("Progress".to_owned(), v(0.3f64)),
                    ("Bytes".to_owned(), v(20u64 << 20)),
                ]),
            ),
        ],
        start,
        Duration::from_millis(250),
    );
    let vms = model.vms();
    assert_eq!(vms.len(), 1);
    assert_eq!(
        (vms[0].name.as_str(), vms[0].state.as_str()),
        ("web", "creating")
    );
    assert_eq!(model.image_name(&vms[0].image), "tiny");
    let now = start + Duration::from_millis(1250);
    let jobs = model.jobs(now);
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.label, "7");
    assert_eq!(job.kind, "vm.create");
    assert_eq!(job.stage, "disks");
    assert_eq!(job.detail, "copying the work seed");
    assert!(job.running());
    // 20 MiB in the 1 s since the job appeared (its first sample).
    let rate = job.rate.expect("a rate");
    assert!((rate - f64::from(20u32 << 20)).abs() < 1.0, "{rate}");
    // 0 → 0.3 in 1 s: the remaining 0.7 takes 2.33 s.
    let eta = job.eta.expect("an eta").as_secs_f64();
    assert!((eta - 7.0 / 3.0).abs() < 0.01, "{eta}");

    apply_all(
        &mut model,
        vec![
            signal(JOB, JOB_INTERFACE, "StageFinished", &("disks", 900_000u64)),
            changed(
                JOB,
                JOB_INTERFACE,
                HashMap::from([(
                    "Stages".to_owned(),
                    v(vec![("disks".to_owned(), 900_000u64)]),
                )]),
            ),
            changed(
                VM,
                VM_INTERFACE,
                HashMap::from([
                    ("State".to_owned(), v("running")),
                    ("IPv4".to_owned(), v("172.30.0.2")),
                ]),
            ),
            changed(
                JOB,
                JOB_INTERFACE,
                HashMap::from([
                    ("State".to_owned(), v("succeeded")),
                    ("Progress".to_owned(), v(1.0f64)),
                ]),
            ),
            signal(
                JOB,
                JOB_INTERFACE,
                "Completed",
                &(true, "", "", ObjectPath::try_from(VM).expect("path")),
            ),
        ],
        now,
        Duration::from_millis(100),
    );
    let vm = &model.vms()[0];
    assert_eq!(
        (vm.state.as_str(), vm.ipv4.as_str()),
        ("running", "172.30.0.2")
    );
    let job = &model.jobs(now)[0];
    assert!(!job.running());
    assert_eq!(job.detail, "");
    assert_eq!(job.stages, vec![("disks".to_owned(), 900_000)]);
    assert_eq!((job.rate, job.eta), (None, None));
    assert_eq!(
        job.outcome,
        Some(Outcome {
            success: true,
            error_name: String::new(),
            message: String::new(),
            result: VM.to_owned(),
        })
    );

    // The job object goes after its retention; the VM is deleted.
    apply_all(
        &mut model,
        vec![removed(JOB, JOB_INTERFACE), removed(VM, VM_INTERFACE)],
        now,
        Duration::ZERO,
    );
    assert!(model.jobs(now).is_empty());
    assert!(model.vms().is_empty());
    assert_eq!(model.images().len(), 1);
}

#[test]
fn a_failed_job_keeps_its_error() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(
        loaded(vec![(JOB, JOB_INTERFACE, job_props("image.pull"))]),
        start,
    );
    apply_all(
        &mut model,
        vec![signal(
            JOB,
            JOB_INTERFACE,
            "Completed",
            &(
                false,
                "org.banger.Error.Unavailable",
                "the catalog is unreachable",
                ObjectPath::try_from("/").expect("path"),
            ),
        )],
        start,
        Duration::ZERO,
    );
    let job = &model.jobs(start)[0];
    assert!(!job.running(), "Completed ends it before State changes");
    let outcome = job.outcome.as_ref().expect("outcome");
    assert!(!outcome.success);
    assert_eq!(outcome.message, "the catalog is unreachable");
    assert_eq!(outcome.result, "");
}

#[test]
fn changes_of_unknown_objects_and_unknown_signals_are_skipped() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(loaded(vec![]), start);
    // A PropertiesChanged before the object's InterfacesAdded.
    apply_all(
        &mut model,
        vec![changed(
            VM,
            VM_INTERFACE,
            HashMap::from([("State".to_owned(), v("running"))]),
        )],
        start,
        Duration::ZERO,
    );
    assert!(model.vms().is_empty());
    // A job signal for a job the model does not know.
    apply_all(
        &mut model,
        vec![progress("x", "", 0.5)],
        start,
        Duration::ZERO,
    );
    assert!(model.jobs(start).is_empty());
    // Members and interfaces the model does not use decode to nothing.
    let other = signal(JOB, JOB_INTERFACE, "Renamed", &("x",));
    assert!(Update::decode(&other).expect("decodes").is_none());
    let other = signal(VM, "org.example.Other", "Changed", &("x",));
    assert!(Update::decode(&other).expect("decodes").is_none());
    // A body of the wrong signature is an error, not a panic.
    let bad = signal(JOB, JOB_INTERFACE, "Progress", &(1u32,));
    assert!(Update::decode(&bad).is_err());
}

#[test]
fn invalidated_properties_are_forgotten() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(
        loaded(vec![(VM, VM_INTERFACE, vm_props("web", "running"))]),
        start,
    );
    let msg = signal(
        VM,
        PROPERTIES,
        "PropertiesChanged",
        &(
            VM_INTERFACE,
            HashMap::<String, OwnedVariant>::new(),
            vec!["IPv4".to_owned()],
        ),
    );
    let mut props = vm_props("web", "running");
    props.insert("IPv4".into(), v("172.30.0.9"));
    model.apply(loaded(vec![(VM, VM_INTERFACE, props)]), start);
    assert_eq!(model.vms()[0].ipv4, "172.30.0.9");
    apply_all(&mut model, vec![msg], start, Duration::ZERO);
    assert_eq!(model.vms()[0].ipv4, "");
}

#[test]
fn a_daemon_that_goes_away_and_comes_back() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(
        loaded(vec![
            (VM, VM_INTERFACE, vm_props("web", "running")),
            (JOB, JOB_INTERFACE, job_props("vm.stop")),
        ]),
        start,
    );
    model.apply(
        Update::Stats {
            path: VM.into(),
            cpu_usec: 1_000_000,
            rss_bytes: 300 << 20,
        },
        start,
    );
    model.apply(Update::Gone("bangerd left the bus".into()), start);
    assert!(!model.connected());
    assert_eq!(model.gone(), Some("bangerd left the bus"));
    // VMs stay on screen, jobs and stats go with the daemon.
    assert_eq!(model.vms().len(), 1);
    assert!(model.jobs(start).is_empty());
    assert_eq!(model.stats(VM), None);

    let mut props = vm_props("web", "stopped");
    props.insert("Name".into(), v("web"));
    model.apply(loaded(vec![(VM, VM_INTERFACE, props)]), start);
    assert!(model.connected());
    assert_eq!(model.gone(), None);
    assert_eq!(model.vms()[0].state, "stopped");
}

#[test]
fn cpu_use_comes_from_two_samples() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(
        loaded(vec![(VM, VM_INTERFACE, vm_props("web", "running"))]),
        start,
    );
    let stats = |cpu_usec| Update::Stats {
        path: VM.into(),
        cpu_usec,
        rss_bytes: 100 << 20,
    };
    model.apply(stats(5_000_000), start);
    assert_eq!(
        model.stats(VM),
        Some(VmStats {
            cpu_percent: None,
            rss_bytes: 100 << 20
        })
    );
    // 1.5 s of CPU in 2 s of wall time: 75 %.
    model.apply(stats(6_500_000), start + Duration::from_secs(2));
    let cpu = model.stats(VM).and_then(|s| s.cpu_percent).expect("cpu");
    assert!((cpu - 75.0).abs() < 1e-9, "{cpu}");
    // Stats of a VM the model does not know are dropped.
    model.apply(
        Update::Stats {
            path: "/org/banger/Manager/vm/gone".into(),
            cpu_usec: 1,
            rss_bytes: 1,
        },
        start,
    );
    assert_eq!(model.stats("/org/banger/Manager/vm/gone"), None);
}

#[test]
fn a_stalled_job_promises_no_eta() {
    let start = Instant::now();
    let mut model = Model::default();
    model.apply(
        loaded(vec![(JOB, JOB_INTERFACE, job_props("image.pull"))]),
        start,
    );
    for (i, fraction) in [0.1f64, 0.2].into_iter().enumerate() {
        let msg = changed(
            JOB,
            JOB_INTERFACE,
            HashMap::from([("Progress".to_owned(), v(fraction))]),
        );
        let update = Update::decode(&msg).expect("decodes").expect("used");
        model.apply(update, start + Duration::from_secs(i as u64 + 1));
    }
    assert!(model.jobs(start + Duration::from_secs(3))[0].eta.is_some());
    assert_eq!(model.jobs(start + Duration::from_secs(30))[0].eta, None);
}
