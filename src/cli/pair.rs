//! `twinvm primary`, `twinvm backup` and `twinvm status`: one replica of a
//! fault-tolerant VM each, configured by flags or a TOML file
//! (docs/operations.md, "Running a fault-tolerant pair").

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use arbiter::auth::Key;
use clap::Args;
use serde::Deserialize;

use super::run::RunArgs;
use super::size::parse_size;
use crate::devices::TickDelivery;
use crate::ft::link::LinkConfig;
use crate::ft::node::{self, query_status, ArbiterSettings, GuestSetup, PairConfig, PairStatus};
use crate::net::NetSpec;
use crate::replay::engine::DEFAULT_SYNC_STATE_EVERY;
use crate::replay::engine::{
    TestPerturbation, DEFAULT_HOT_PAGE_BUDGET, DEFAULT_SYNC_BOUND_US, DEFAULT_SYNC_BUDGET_PERCENT,
    DEFAULT_TICK_DEFERRAL,
};

/// Settings of a replica; flags override the `--config` file.
#[derive(Debug, Clone, Args, Default)]
pub struct PairArgs {
    /// A TOML file with these settings (see docs/operations.md); flags given
    /// as well override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The VM's name, the same on both sides (the arbiter's slot).
    #[arg(long)]
    pub vm: Option<String>,
    /// The pair's generation (raised after each repair).
    #[arg(long)]
    pub generation: Option<u64>,
    /// The logging channel's pre-shared key (64 hex digits, mode 0600;
    /// `twinvm arbiter keygen --out PATH` makes one).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Arbiter nodes, host:port, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub arbiter: Vec<String>,
    /// The arbiter's key file (default: --key-file).
    #[arg(long)]
    pub arbiter_key_file: Option<PathBuf>,
    /// The arbiter's cluster id.
    #[arg(long)]
    pub arbiter_cluster: Option<String>,
    /// This host's name (default: the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// The control socket for `twinvm status` (default
    /// /run/twinvm/VM-ROLE.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Heartbeat interval in milliseconds.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// A peer silent this long (ms) is suspected and the arbiter asked.
    #[arg(long)]
    pub peer_timeout_ms: Option<u64>,
    /// Host CPU for the vCPU thread (the backup defaults to the primary's).
    #[arg(long)]
    pub host_cpu: Option<u32>,
    /// Microseconds a due interrupt may wait for a landmark (see `record`).
    #[arg(long)]
    pub sync_bound_us: Option<u64>,
    /// Milliseconds a timer tick may wait while the guest is in user mode
    /// (see `record`; default 0 = off, up to 1000).
    #[arg(long)]
    pub tick_deferral_ms: Option<u64>,
    /// The most of the time, in percent, the primary's sync points for
    /// timer ticks may keep the guest stopped (see `record`; default 5,
    /// 0 = off).
    #[arg(long)]
    pub sync_budget_percent: Option<u8>,
    /// How the primary's timer ticks reach the guest: landmarks (the
    /// default), window-exits or catch-up (see `record`).
    #[arg(long, value_name = "RULE")]
    pub tick_delivery: Option<TickDelivery>,
    /// Most guest pages the primary's recording leaves write-enabled
    /// between dirty-log harvests (see `record --hot-pages`; default 8192).
    #[arg(long, value_name = "PAGES", value_parser = super::replay::parse_hot_pages)]
    pub hot_pages: Option<usize>,
    /// Least time between two of the primary's sync points that carry the
    /// devices' state, where a backup that fell behind catches up (see
    /// `record`: one is made if none came for four times this; default 50,
    /// 0 = every sync point).
    #[arg(long, value_name = "MS")]
    pub sync_state_every_ms: Option<u64>,
    /// Guest kernel (as for `twinvm run`).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory (512M, 2G, or MiB).
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// The guest's NIC: `tap=NAME[,mac=MAC]`; the same MAC on both sides.
    #[arg(long)]
    pub net: Option<NetSpec>,
    /// Where the console goes: `stdio` or a file.
    #[arg(long)]
    pub serial: Option<String>,
}

/// `twinvm primary`.
#[derive(Debug, Clone, Args)]
pub struct PrimaryArgs {
    /// The backup's logging-channel address, host:port.
    #[arg(long)]
    pub backup: Option<String>,
    #[command(flatten)]
    pub pair: PairArgs,
}

/// `twinvm backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Where to wait for the primary, host:port.
    #[arg(long)]
    pub listen: Option<String>,
    /// Test hook (as `replay --test-perturb`): make this replica wrong on
    /// purpose at one landmark, to prove the pair stops a diverged backup.
    #[arg(long, hide = true, value_name = "KIND@LANDMARK")]
    pub test_perturb: Option<TestPerturbation>,
    /// Become the backup of a primary running alone by receiving a clone
    /// of its live VM (`twinvm clone --to` this --listen address); the
    /// generation comes from the primary.
    #[arg(long)]
    pub from_clone: bool,
    #[command(flatten)]
    pub pair: PairArgs,
}

/// `twinvm status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The replica's control socket.
    #[arg(long)]
    pub control: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The `--config` file: the same settings, plus the role's address.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    vm: Option<String>,
    generation: Option<u64>,
    key_file: Option<PathBuf>,
    node: Option<String>,
    control: Option<PathBuf>,
    heartbeat_ms: Option<u64>,
    peer_timeout_ms: Option<u64>,
    host_cpu: Option<u32>,
    sync_bound_us: Option<u64>,
    tick_deferral_ms: Option<u64>,
    sync_budget_percent: Option<u8>,
    tick_delivery: Option<String>,
    hot_pages: Option<usize>,
    sync_state_every_ms: Option<u64>,
    backup: Option<String>,
    listen: Option<String>,
    #[serde(default)]
    arbiter: ArbiterFile,
    #[serde(default)]
    guest: GuestFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArbiterFile {
    #[serde(default)]
    addrs: Vec<String>,
    key_file: Option<PathBuf>,
    cluster: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestFile {
    kernel: Option<String>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    mem: Option<String>,
    net: Option<String>,
    serial: Option<String>,
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

/// Which replica this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Backup,
    /// A backup made by a clone: its generation comes from the primary.
    ClonedBackup,
}

/// Flags over file: the replica's settings, its guest and its peer address.
fn resolve(
    args: &PairArgs,
    side: Side,
    address: Option<&str>,
) -> Result<(PairConfig, GuestSetup, String)> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => ConfigFile::default(),
    };
    let need = |what: &str, v: Option<String>| -> Result<String> {
        v.with_context(|| format!("--{what} is required (or `{what}` in --config)"))
    };
    let vm = need("vm", args.vm.clone().or(file.vm))?;
    if vm.is_empty() || vm.len() > 256 {
        bail!("--vm must be 1 to 256 bytes");
    }
    let generation = match (args.generation.or(file.generation), side) {
        (Some(g), _) => g,
        // Replaced by the generation the primary's clone names.
        (None, Side::ClonedBackup) => 0,
        (None, _) => bail!("--generation is required (or `generation` in --config)"),
    };
    let key_path = args
        .key_file
        .clone()
        .or(file.key_file)
        .context("--key-file is required (or `key_file` in --config)")?;
    let key = Key::from_file(&key_path)
        .with_context(|| format!("reading the key {}", key_path.display()))?;
    let mut arbiter_addrs = args.arbiter.clone();
    if arbiter_addrs.is_empty() {
        arbiter_addrs = file.arbiter.addrs;
    }
    if arbiter_addrs.is_empty() {
        bail!("--arbiter is required (host:port of the arbiter nodes, or [arbiter] addrs in --config)");
    }
    let arbiter_key = match args.arbiter_key_file.clone().or(file.arbiter.key_file) {
        Some(path) => Key::from_file(&path)
            .with_context(|| format!("reading the arbiter key {}", path.display()))?,
        None => key.clone(),
    };
    let node = match args.node.clone().or(file.node) {
        Some(n) => n,
        None => hostname(),
    };
    let role = match side {
        Side::Primary => "primary",
        Side::Backup | Side::ClonedBackup => "backup",
    };
    let control = args
        .control
        .clone()
        .or(file.control)
        .unwrap_or_else(|| PathBuf::from(format!("/run/twinvm/{vm}-{role}.sock")));
    let mut link = LinkConfig::default();
    if let Some(ms) = args.heartbeat_ms.or(file.heartbeat_ms) {
        link.heartbeat_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.peer_timeout_ms.or(file.peer_timeout_ms) {
        link.peer_timeout = Duration::from_millis(ms);
    }
    link.validate()
        .context("--heartbeat-ms / --peer-timeout-ms")?;
    let sync_bound = Duration::from_micros(
        args.sync_bound_us
            .or(file.sync_bound_us)
            .unwrap_or(DEFAULT_SYNC_BOUND_US),
    );
    if sync_bound.is_zero() || sync_bound > Duration::from_secs(1) {
        bail!("--sync-bound-us must be 1 to 1000000");
    }
    let tick_deferral = match args.tick_deferral_ms.or(file.tick_deferral_ms) {
        Some(ms) if ms > 1000 => bail!("--tick-deferral-ms must be 0 to 1000"),
        Some(ms) => Duration::from_millis(ms),
        None => DEFAULT_TICK_DEFERRAL,
    };
    let sync_budget_percent =
        sync_budget_setting(args.sync_budget_percent.or(file.sync_budget_percent))?;
    let tick_delivery = tick_delivery_setting(args.tick_delivery, file.tick_delivery.as_deref())?;
    let hot_pages = hot_pages_setting(args.hot_pages, file.hot_pages)?;
    let address = match side {
        Side::Primary => need("backup", address.map(str::to_string).or(file.backup))?,
        Side::Backup | Side::ClonedBackup => {
            need("listen", address.map(str::to_string).or(file.listen))?
        }
    };
    let guest_file = file.guest;
    let net = match (&args.net, &guest_file.net) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(text)) => Some(
            text.parse::<NetSpec>()
                .with_context(|| format!("[guest] net = {text:?}"))?,
        ),
        (None, None) => None,
    };
    let mem = match (args.mem, &guest_file.mem) {
        (Some(m), _) => m,
        (None, Some(text)) => parse_size(text)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("[guest] mem = {text:?}"))?,
        (None, None) => 256 << 20,
    };
    let run = RunArgs {
        kernel: need("kernel", args.kernel.clone().or(guest_file.kernel))?,
        initrd: args.initrd.clone().or(guest_file.initrd),
        cmdline: args
            .cmdline
            .clone()
            .or(guest_file.cmdline)
            .unwrap_or_else(|| "console=ttyS0".into()),
        mem,
        serial: args
            .serial
            .clone()
            .or(guest_file.serial)
            .unwrap_or_else(|| "stdio".into()),
        stats: false,
        net: net.clone(),
    };
    let guest = GuestSetup {
        vm: run.vm_config()?,
        net,
        console: run.serial_sink()?,
        boot_unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        test_perturbation: None,
    };
    // The pair records and replays: refuse what could not be replayed.
    super::run::require_replayable(&guest.vm)?;
    let config = PairConfig {
        vm,
        generation,
        node,
        key,
        arbiter: ArbiterSettings {
            addrs: arbiter_addrs,
            cluster_id: args
                .arbiter_cluster
                .clone()
                .or(file.arbiter.cluster)
                .unwrap_or_else(|| "twinvm".into()),
            key: Some(arbiter_key),
            attempt_deadline: Duration::from_millis(500),
        },
        link,
        control,
        host_cpu: args.host_cpu.or(file.host_cpu),
        sync_bound,
        tick_deferral,
        sync_budget_percent,
        tick_delivery,
        hot_pages,
        sync_state_every: args
            .sync_state_every_ms
            .or(file.sync_state_every_ms)
            .map_or(DEFAULT_SYNC_STATE_EVERY, Duration::from_millis),
    };
    Ok((config, guest, address))
}

/// The primary's hot-page budget: the flag (checked by clap), else the
/// config file's `hot_pages` (checked here against the same bound), else
/// the default.
fn hot_pages_setting(flag: Option<usize>, file: Option<usize>) -> Result<usize> {
    match (flag, file) {
        (Some(pages), _) => Ok(pages),
        (None, Some(pages)) => super::replay::parse_hot_pages(&pages.to_string())
            .map_err(anyhow::Error::msg)
            .context("`hot_pages` in --config"),
        (None, None) => Ok(DEFAULT_HOT_PAGE_BUDGET),
    }
}

/// The primary's tick delivery: the flag (parsed by clap), else the config
/// file's `tick_delivery` (parsed here), else the default (at landmarks).
fn tick_delivery_setting(flag: Option<TickDelivery>, file: Option<&str>) -> Result<TickDelivery> {
    match (flag, file) {
        (Some(rule), _) => Ok(rule),
        (None, Some(name)) => name
            .parse::<TickDelivery>()
            .context("`tick_delivery` in --config"),
        (None, None) => Ok(TickDelivery::default()),
    }
}

/// The primary's sync-point budget: the flag or the file's
/// `sync_budget_percent`, else the default.
fn sync_budget_setting(given: Option<u8>) -> Result<u8> {
    match given {
        Some(percent) if percent > 100 => {
            bail!(
                "--sync-budget-percent (or `sync_budget_percent`) must be 0 to 100, not {percent}"
            )
        }
        Some(percent) => Ok(percent),
        None => Ok(DEFAULT_SYNC_BUDGET_PERCENT),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "twinvm-host".into())
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `twinvm primary`.
pub fn primary(args: &PrimaryArgs) -> Result<ExitCode> {
    let (config, guest, backup) = resolve(&args.pair, Side::Primary, args.backup.as_deref())?;
    Ok(exit(node::run_primary(config, guest, &backup)?))
}

/// `twinvm backup`.
pub fn backup(args: &BackupArgs) -> Result<ExitCode> {
    let side = if args.from_clone {
        Side::ClonedBackup
    } else {
        Side::Backup
    };
    let (config, mut guest, listen) = resolve(&args.pair, side, args.listen.as_deref())?;
    if let Some(p) = args.test_perturb {
        eprintln!("twinvm backup: --test-perturb {p}: this replica is made wrong on purpose");
        guest.test_perturbation = Some(p);
    }
    Ok(exit(node::run_backup_from(
        config,
        guest,
        &listen,
        args.from_clone,
    )?))
}

/// `twinvm status`.
pub fn status(args: &StatusArgs) -> Result<ExitCode> {
    let s = query_status(&args.control).map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", describe(&s));
    }
    Ok(ExitCode::SUCCESS)
}

/// A replica's status as text.
pub fn describe(s: &PairStatus) -> String {
    format!(
        "vm {} generation {} on {}: {} ({}){}\n\
         landmark {}  watermark {}  acked {}  released {}\n\
         lag {} landmarks, {:.1} ms{}   log {:.2} Mbit/s ({} bytes)\n\
         held outputs {}  hold p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms ({} released)\n\
         peer {}   up {:.1} s\n{}",
        s.vm,
        s.generation,
        s.node,
        s.role,
        s.state,
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(": {}", s.detail)
        },
        s.landmark,
        s.watermark,
        s.acked,
        s.released,
        s.lag_landmarks,
        s.lag_ms,
        if s.catch_ups > 0 {
            format!(" (caught up {} times)", s.catch_ups)
        } else {
            String::new()
        },
        s.log_mbit_s,
        s.log_bytes,
        s.held_outputs,
        s.hold_ms.p50,
        s.hold_ms.p99,
        s.hold_ms.max,
        s.hold_ms.count,
        if s.peer_connected {
            "connected"
        } else {
            "not connected"
        },
        s.uptime_s,
        match &s.page_cache {
            Some(c) => format!(
                "page cache {:.1} of {:.1} MiB ({} of {} pages); pages of sync points: {} from the cache, {} whole, {} zero\n",
                c.bytes as f64 / (1 << 20) as f64,
                (c.limit_pages * 4096) as f64 / (1 << 20) as f64,
                c.pages,
                c.limit_pages,
                c.hits,
                c.whole,
                c.zero
            ),
            None => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_cache_line_appears_once_there_is_one() {
        let mut s = PairStatus::default();
        assert!(!describe(&s).contains("page cache"));
        s.page_cache = Some(crate::ft::node::PageCacheStatus {
            pages: 1028,
            bytes: 4 << 20,
            limit_pages: 16_384,
            hits: 1295,
            whole: 1028,
            zero: 4,
        });
        let text = describe(&s);
        assert!(
            text.contains("page cache 4.0 of 64.0 MiB (1028 of 16384 pages)")
                && text.contains("1295 from the cache, 1028 whole, 4 zero"),
            "{text}"
        );
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PairStatus>(&json).unwrap(), s);
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
        let err = toml::from_str::<ConfigFile>("vm = \"a\"\ngenration = 3\n").unwrap_err();
        assert!(err.to_string().contains("genration"), "{err}");
        let err = toml::from_str::<ConfigFile>("[guest]\nkernal = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("kernal"), "{err}");
        let ok: ConfigFile = toml::from_str(
            "vm = \"demo\"\ngeneration = 1\nkey_file = \"/k\"\nbackup = \"10.0.0.2:7200\"\n\
             [arbiter]\naddrs = [\"a:1\", \"b:2\"]\n[guest]\nkernel = \"builtin:counter\"\nmem = \"64M\"\n",
        )
        .unwrap();
        assert_eq!(ok.arbiter.addrs.len(), 2);
        assert_eq!(ok.guest.mem.as_deref(), Some("64M"));
        let ok: ConfigFile = toml::from_str("tick_deferral_ms = 0\n").unwrap();
        assert_eq!(ok.tick_deferral_ms, Some(0));
    }

    #[test]
    fn the_sync_budget_comes_from_the_flag_or_the_file_and_is_bounded() {
        let file: ConfigFile = toml::from_str("sync_budget_percent = 0\n").unwrap();
        assert_eq!(sync_budget_setting(file.sync_budget_percent).unwrap(), 0);
        assert_eq!(
            sync_budget_setting(None).unwrap(),
            DEFAULT_SYNC_BUDGET_PERCENT
        );
        let err = sync_budget_setting(Some(150)).unwrap_err().to_string();
        assert!(err.contains("0 to 100, not 150"), "{err}");
        // Not a percent at all: the file's parser names the key.
        let err = toml::from_str::<ConfigFile>("sync_budget_percent = -1\n").unwrap_err();
        assert!(err.to_string().contains("sync_budget_percent"), "{err}");
    }

    #[test]
    fn the_tick_delivery_comes_from_the_flag_the_file_or_the_default() {
        let file: ConfigFile = toml::from_str("tick_delivery = \"window-exits\"\n").unwrap();
        let from_file = tick_delivery_setting(None, file.tick_delivery.as_deref()).unwrap();
        assert_eq!(from_file, TickDelivery::AtWindowExits);
        let flag = Some(TickDelivery::CatchUpAtWindowExits);
        assert_eq!(
            tick_delivery_setting(flag, Some("window-exits")).unwrap(),
            TickDelivery::CatchUpAtWindowExits
        );
        assert_eq!(
            tick_delivery_setting(None, None).unwrap(),
            TickDelivery::AtLandmarks
        );
        let err = format!(
            "{:#}",
            tick_delivery_setting(None, Some("often")).unwrap_err()
        );
        assert!(
            err.contains("tick_delivery") && err.contains("`often`"),
            "{err}"
        );
        let argv = ["twinvm", "primary", "--tick-delivery", "often"];
        let err = <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown tick delivery `often`"), "{err}");
    }

    #[test]
    fn the_hot_page_budget_comes_from_the_flag_the_file_or_the_default() {
        let file: ConfigFile = toml::from_str("hot_pages = 512\n").unwrap();
        assert_eq!(hot_pages_setting(None, file.hot_pages).unwrap(), 512);
        assert_eq!(hot_pages_setting(Some(0), file.hot_pages).unwrap(), 0);
        assert_eq!(
            hot_pages_setting(None, None).unwrap(),
            DEFAULT_HOT_PAGE_BUDGET
        );
        let err = format!("{:#}", hot_pages_setting(None, Some(1 << 20)).unwrap_err());
        assert!(err.contains("hot_pages") && err.contains("65536"), "{err}");
        let argv = ["twinvm", "primary", "--hot-pages", "lots"];
        let err = <crate::cli::Cli as clap::Parser>::try_parse_from(argv)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a number of pages"), "{err}");
    }

    #[test]
    fn missing_settings_are_named() {
        let err = resolve(&PairArgs::default(), Side::Primary, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--vm is required"), "{err}");
        let args = PairArgs {
            vm: Some("demo".into()),
            ..PairArgs::default()
        };
        let err = resolve(&args, Side::Backup, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--generation is required"), "{err}");
    }
}
