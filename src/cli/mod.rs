//! The `imagestream` command line: `serve` runs the daemon; every other subcommand is a client of
//! the admin API on the admin socket. Output is a table by default and JSON with `-o json`;
//! errors are one line on stderr with a non-zero exit code.

mod output;

use crate::admin::client::connect;
use crate::admin::pb;
use crate::config::{Config, Overrides, DEFAULT_ADMIN_SOCKET};
use crate::stream::reference::{parse_stream_key, parse_tag_ref};
use clap::{Args, Parser, Subcommand, ValueEnum};
use output::Printer;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "imagestream",
    version,
    about = "Image streams for Kubernetes nodes: a CRI proxy that pins stream tags to verified digests",
    long_about = "imagestream sits between the kubelet and the container runtime (containerd, CRI-O). \
Pods that name a stream tag (imagestream.local/NAMESPACE/STREAM:TAG, or STREAM:TAG for streams with \
--lookup-local) run the digest the tag is pinned to; tags have a history and can be moved and rolled \
back without re-pushing.\n\nRun the daemon with `imagestream serve`; the other subcommands talk to it \
over the admin socket.",
    after_help = "Examples:\n  imagestream stream create team-a/app --lookup-local\n  imagestream tag set team-a/app:prod registry.example.com/team/app:v1\n  imagestream tag rollback team-a/app:prod\n  imagestream resolve app:prod --namespace team-a"
)]
pub struct Cli {
    /// Admin socket of the daemon [default: /run/imagestream/admin.sock, or the config file's]
    #[arg(
        long,
        global = true,
        env = "IMAGESTREAM_ADMIN_SOCKET",
        value_name = "PATH"
    )]
    admin_socket: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: the CRI proxy and the admin API
    Serve(ServeArgs),
    /// Create, list, show and remove image streams
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Point tags at images, roll them back, show their history
    #[command(subcommand)]
    Tag(TagCommand),
    /// Show what a pod in NAMESPACE would run for REFERENCE, without pulling
    Resolve {
        /// An image reference: imagestream.local/NS/STREAM:TAG, STREAM:TAG, or any other image
        reference: String,
        /// The pod's namespace (needed for short names)
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Follow tag changes as they happen (set, import, rollback, delete); with -o json one JSON
    /// object per line, for scripts
    #[command(
        after_help = "Examples:\n  imagestream watch                 # every stream\n  imagestream watch team-a          # streams of namespace team-a\n  imagestream watch team-a/app -o json | while read -r event; do ...; done\n\nExits with an error if it falls too far behind (it missed events): re-list and watch again."
    )]
    Watch {
        /// NAMESPACE or NAMESPACE/NAME (default: all streams)
        filter: Option<String>,
    },
    /// Print the daemon's counters (Prometheus text format; also at GET /metrics on the mirror)
    Metrics,
    /// Show the node's stream store: embedded or etcd, whether etcd answers, how stale this
    /// node's view is, and which node runs scheduled imports
    Status,
    /// Inspect and maintain the node's layer cache
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Configure containerd or CRI-O to pull through the node's registry mirror
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Print the effective daemon configuration (defaults, config file, flags) as TOML
    Config(ServeArgs),
    /// Set up the peer endpoint (nodes serving cached blobs to each other over mutual TLS)
    #[command(subcommand)]
    Peer(PeerCommand),
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Make the cluster CA and node certificates for mutual TLS between nodes (runs locally,
    /// no daemon needed)
    #[command(
        long_about = "Make the cluster CA and node certificates for mutual TLS between nodes. \
Runs locally; no daemon is needed.\n\n\
Nodes serve cached blobs to each other over HTTPS. Both sides present a certificate issued by \
the cluster CA and accept only certificates issued by it (no system roots): a node refuses \
clients without such a certificate, and clients refuse nodes without one.\n\n\
Files written in DIR (mode 0600; DIR is created with mode 0700):\n  \
ca.pem           the cluster CA certificate: copy it to every node (config key peer_ca_file)\n  \
ca-key.pem       the CA's private key: keep it here, no node needs it\n  \
NAME.pem         node NAME's certificate (config key peer_cert_file)\n  \
NAME-key.pem     node NAME's private key (config key peer_key_file): copy it to that node only\n\n\
A CA already in DIR (ca.pem and ca-key.pem) is reused, so nodes can be added later by running \
the command again with just the new nodes. Running it for an existing node re-issues its \
certificate with a new key (e.g. to renew it). Node certificates are valid for 1 year, the CA \
for 10 years; there is no revocation: to shut a node out before its certificate expires, make a \
new CA (remove ca.pem and ca-key.pem) and re-issue every node.",
        after_help = "Each certificate names the node (NAME, a DNS label) and its addresses: the IPs \
other nodes dial it at (at least one) and any DNS names.\n\n\
Examples:\n  \
imagestream peer certs --dir /root/imagestream-ca --node node-a=10.0.0.1 --node node-b=10.0.0.2,node-b.lan\n  \
imagestream peer certs --dir /root/imagestream-ca --node node-c=10.0.0.3   # later: same CA\n\n\
Then on node-a, in /etc/imagestream/config.toml:\n  \
peer_ca_file = \"/etc/imagestream/peer/ca.pem\"\n  \
peer_cert_file = \"/etc/imagestream/peer/node-a.pem\"\n  \
peer_key_file = \"/etc/imagestream/peer/node-a-key.pem\""
    )]
    Certs {
        /// Directory of the CA and node files (created with mode 0700 if missing; a CA in it is
        /// reused)
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A node to issue a certificate for: NAME=IP[,IP|DNS...], e.g.
        /// node-a=10.0.0.1,node-a.lan (repeatable; at least one)
        #[arg(long = "node", value_name = "NAME=IP[,IP|DNS...]", required = true)]
        nodes: Vec<crate::peer::tls::NodeSpec>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Config file [default: /etc/imagestream/config.toml if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory [default: /var/lib/imagestream]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// CRI socket the kubelet talks to [default: /run/imagestream/imagestream.sock]
    #[arg(long, value_name = "PATH")]
    cri_socket: Option<PathBuf>,
    /// The real runtime's CRI endpoint [default: unix:///run/containerd/containerd.sock]
    #[arg(long, value_name = "ENDPOINT")]
    runtime_endpoint: Option<String>,
    /// A registry reached over plain HTTP, HOST:PORT (repeatable; the mirror may pull from it)
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Address of the registry mirror and /metrics [default: 127.0.0.1:5050]
    #[arg(long, value_name = "ADDR")]
    mirror_listen: Option<String>,
    /// A registry the mirror may pull through from, http://HOST:PORT or https://HOST (repeatable)
    #[arg(long = "mirror-upstream", value_name = "URL")]
    mirror_upstreams: Vec<String>,
    /// Where streams are kept: embedded (this node's redb) or etcd (shared by the cluster)
    /// [default: embedded]
    #[arg(long, value_enum, value_name = "KIND")]
    store: Option<crate::config::StoreKind>,
    /// An etcd client URL for --store etcd (repeatable) [default: http://127.0.0.1:2379]
    #[arg(long = "etcd-endpoint", value_name = "URL")]
    etcd_endpoints: Vec<String>,
    /// Log format on stderr
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum StreamCommand {
    /// Create a stream NAMESPACE/NAME
    Create {
        /// NAMESPACE/NAME
        stream: String,
        /// Let pods of the namespace use the short name NAME:TAG
        #[arg(long)]
        lookup_local: bool,
    },
    /// List streams
    #[command(alias = "list")]
    Ls {
        /// Only this namespace
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Show a stream and its tags
    Get {
        /// NAMESPACE/NAME
        stream: String,
    },
    /// Remove a stream and all its tags
    #[command(alias = "delete")]
    Rm {
        /// NAMESPACE/NAME
        stream: String,
    },
    /// Choose which namespaces' pods may use a stream (default: its own namespace only)
    #[command(
        after_help = "Patterns are namespace names or globs. A deny wins over an allow; the stream's own namespace is allowed unless denied.\nExamples:\n  imagestream stream access team-a/app --allow 'team-*' --deny team-x\n  imagestream stream access team-a/app --remove 'team-*'\n  imagestream stream access team-a/app --reset"
    )]
    Access {
        /// NAMESPACE/NAME
        stream: String,
        /// Allow pods of namespaces matching PATTERN (repeatable)
        #[arg(long, value_name = "PATTERN")]
        allow: Vec<String>,
        /// Deny pods of namespaces matching PATTERN (repeatable)
        #[arg(long, value_name = "PATTERN")]
        deny: Vec<String>,
        /// Remove PATTERN from both lists (repeatable)
        #[arg(long, value_name = "PATTERN")]
        remove: Vec<String>,
        /// Empty both lists first
        #[arg(long)]
        reset: bool,
    },
    /// Set which cosign keys a stream trusts, and how strictly (README, "Signed images")
    #[command(
        after_help = "Modes:\n  enforce  a digest enters the stream (tag set, import, follow, rollback) only if a cosign\n           signature by one of the keys verifies; pods run only verified generations\n  warn     every digest is pinned; one that does not verify is recorded, logged and counted\n  off      nothing is checked (overrides the node's default policy)\nKeys are cosign public keys (cosign.pub, PEM): ECDSA P-256/P-384/P-521 or RSA.\nExamples:\n  imagestream stream policy team-a/app --key /etc/imagestream/keys/ci.pub --mode enforce\n  imagestream stream policy team-a/app --mode off\n  imagestream stream policy team-a/app --clear        (the node's default applies)\nGenerations pinned before a policy was set show as unverified in `stream get`; check them\nwith `imagestream tag verify NS/NAME:TAG`."
    )]
    Policy {
        /// NAMESPACE/NAME
        stream: String,
        /// A trusted cosign public key, PEM (repeatable)
        #[arg(long, value_name = "FILE")]
        key: Vec<std::path::PathBuf>,
        /// enforce, warn or off
        #[arg(long, value_name = "MODE", required_unless_present = "clear", value_parser = ["enforce", "warn", "off"])]
        mode: Option<String>,
        /// Remove the stream's own policy: the node's default applies
        #[arg(long, conflicts_with_all = ["key", "mode"])]
        clear: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// List cached blobs: digest, size, last use, and the stream tags that pin them
    #[command(alias = "list")]
    Ls,
    /// Re-hash every cached blob and evict those whose bytes no longer match
    Verify,
    /// Evict least-recently-used unpinned blobs until the cache is within its size limit
    Gc,
    /// Drop one cached blob (refused for a blob a stream tag pins)
    Rm {
        /// sha256:<hex>
        digest: String,
    },
}

#[derive(Debug, Subcommand)]
enum MirrorCommand {
    /// Write containerd's hosts.toml so that REGISTRY's pulls go through the mirror first, with
    /// fallback to REGISTRY itself
    #[command(
        after_help = "containerd must read registry hosts from DIR: in /etc/containerd/config.toml,
  [plugins.\"io.containerd.grpc.v1.cri\".registry]
    config_path = \"/etc/containerd/certs.d\"
containerd re-reads hosts.toml on every pull; no restart is needed once config_path is set.

Example:
  imagestream mirror hosts-toml --registry registry.example.com"
    )]
    HostsToml {
        /// The registry whose pulls go through the mirror: HOST or HOST:PORT (docker.io for Docker Hub)
        #[arg(long, value_name = "HOST")]
        registry: String,
        /// containerd's registry config_path
        #[arg(long, value_name = "DIR", default_value = crate::mirror::hosts_toml::DEFAULT_CERTS_DIR)]
        dir: PathBuf,
        /// The mirror's URL [default: http:// + mirror_listen of the daemon's config]
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Daemon config file to read mirror_listen and insecure_registries from
        /// [default: /etc/imagestream/config.toml if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the file instead of writing it
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a CRI-O registries.conf drop-in so that REGISTRY's pulls go through the mirror
    /// first, with fallback to REGISTRY itself
    #[command(
        after_help = "CRI-O reads drop-ins from /etc/containers/registries.conf.d (its hidden flag
--registries-conf-dir, or CONTAINER_REGISTRIES_CONF_DIR, chooses another directory), when it
starts and on SIGHUP: after writing, run `systemctl reload crio`, or set
  [crio.image]
    auto_reload_registries = true
in crio.conf to have CRI-O pick up changes in the directory by itself.
The file's [[registry]] replaces any other one for REGISTRY (registries.conf or an earlier
drop-in): it is complete, with the registry's own insecure setting.
The mirror location carries the registry as a path prefix, e.g. a pull of
127.0.0.1:5000/team/app:v1 is sent to the mirror as
127.0.0.1:5050/imagestream--upstream/127.0.0.1_5000/team/app:v1. REGISTRY must be allowed by
the daemon (mirror_upstreams or insecure_registries).

Example:
  imagestream mirror registries-conf --registry registry.example.com
  # writes /etc/containers/registries.conf.d/imagestream-registry.example.com.conf"
    )]
    RegistriesConf {
        /// The registry whose pulls go through the mirror: HOST or HOST:PORT (docker.io for Docker Hub)
        #[arg(long, value_name = "HOST")]
        registry: String,
        /// The drop-in directory; the file is imagestream-<HOST>.conf, with HOST's ':' written '_'
        #[arg(long, value_name = "DIR", default_value = crate::mirror::registries_conf::DEFAULT_DROP_IN_DIR)]
        dir: PathBuf,
        /// Write this file instead of one in DIR (CRI-O reads only *.conf files there)
        #[arg(long, value_name = "PATH", conflicts_with = "dir")]
        file: Option<PathBuf>,
        /// The mirror's URL [default: http:// + mirror_listen of the daemon's config]
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// Daemon config file to read mirror_listen and insecure_registries from
        /// [default: /etc/imagestream/config.toml if present]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the file instead of writing it
        #[arg(long, alias = "dry-run")]
        print: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TagCommand {
    /// Point NAMESPACE/NAME:TAG at SOURCE (resolved and verified in its registry now)
    #[command(
        after_help = "Examples:\n  imagestream tag set team-a/app:prod registry.example.com/team/app:v1\n  imagestream tag set team-a/app:prod registry.example.com/team/app:stable --scheduled --interval 5m\n  imagestream tag set team-a/app:canary --from-stream team-a/base:prod   # moves when base:prod moves"
    )]
    Set {
        /// NAMESPACE/NAME:TAG
        tag: String,
        /// An image reference, by tag (registry/repo:tag) or digest (registry/repo@sha256:...),
        /// or another stream's tag (imagestream.local/NS/NAME:TAG), which this tag then follows
        #[arg(
            required_unless_present = "from_stream",
            conflicts_with = "from_stream"
        )]
        source: Option<String>,
        /// Follow another stream's tag NS/NAME:TAG: this tag moves whenever that one moves
        #[arg(long, value_name = "NS/NAME:TAG")]
        from_stream: Option<String>,
        /// Keep following SOURCE: re-resolve it every --interval; a new digest becomes a
        /// generation with cause "import" (without this flag the tag stops following)
        #[arg(long)]
        scheduled: bool,
        /// How often a scheduled tag is re-resolved: 30s, 15m, 1h [default: 15m]
        #[arg(long, value_name = "DURATION", requires = "scheduled", value_parser = crate::importer::parse_interval)]
        interval: Option<u64>,
    },
    /// Point a tag back at an earlier digest (default: the previous one)
    Rollback {
        /// NAMESPACE/NAME:TAG
        tag: String,
        /// The generation to go back to
        #[arg(long, value_name = "N")]
        to_generation: Option<u64>,
    },
    /// Re-resolve a tag's source now (e.g. after a force-push); a new digest becomes a new
    /// generation with cause "import"
    Import {
        /// NAMESPACE/NAME:TAG
        tag: String,
    },
    /// Show a tag's generations, newest first, and whether this node holds each
    History {
        /// NAMESPACE/NAME:TAG
        tag: String,
    },
    /// Check the cosign signatures of a tag's kept generations again under its stream's
    /// policy and record each outcome (after a policy was set or its keys changed); exits 1
    /// when the current generation may not run under an enforce policy
    Verify {
        /// NAMESPACE/NAME:TAG
        tag: String,
    },
    /// Remove a tag and its history
    #[command(alias = "delete")]
    Rm {
        /// NAMESPACE/NAME:TAG
        tag: String,
    },
}

/// Most bytes read from a `--key` file: a PEM public key is well under this.
const MAX_KEY_FILE_BYTES: u64 = crate::signature::MAX_KEY_PEM_BYTES as u64;

/// Reads a `--key` file (a PEM public key), refusing anything larger than a key.
fn read_key_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read key {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read key {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "key {} is over {MAX_KEY_FILE_BYTES} bytes: not a PEM public key",
            path.display()
        ));
    }
    Ok(text)
}

/// Runs the command line; returns the process exit code.
pub async fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("error: {message}");
            1
        }
    }
}

fn serve_config(args: &ServeArgs, admin_socket: Option<PathBuf>) -> Result<Config, String> {
    Config::load(
        args.config.as_deref(),
        Overrides {
            state_dir: args.state_dir.clone(),
            cri_socket: args.cri_socket.clone(),
            admin_socket,
            runtime_endpoint: args.runtime_endpoint.clone(),
            insecure_registries: args.insecure_registries.clone(),
            mirror_listen: args.mirror_listen.clone(),
            mirror_upstreams: args.mirror_upstreams.clone(),
            store: args.store,
            etcd_endpoints: args.etcd_endpoints.clone(),
        },
    )
    .map_err(|e| e.to_string())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Watches SIGTERM and SIGINT from now on (a signal that arrives while the daemon is still
/// starting is kept, and honoured as soon as it is up); the future completes on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM/SIGINT");
                std::future::pending::<()>().await
            }
        }
    }
}

fn status(e: tonic::Status) -> String {
    let message = e.message();
    if message.is_empty() {
        format!("{:?}", e.code())
    } else {
        message.to_string()
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let printer = Printer::new(cli.output);
    let admin_socket = cli.admin_socket.clone();
    // Clients only: the daemon's own socket comes from its config.
    let socket = || admin_socket.clone().unwrap_or_else(default_admin_socket);
    match cli.command {
        Command::Serve(args) => {
            let config = serve_config(&args, admin_socket.clone())?;
            init_logging(args.log_format);
            crate::server::run(config, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }
        Command::Config(args) => {
            let config = serve_config(&args, admin_socket.clone())?;
            match cli.output {
                Format::Json => printer.json(&config),
                Format::Table => {
                    print!("{}", toml::to_string(&config).map_err(|e| e.to_string())?)
                }
            }
            Ok(())
        }
        Command::Stream(cmd) => {
            let mut client = connect(&socket()).await?;
            match cmd {
                StreamCommand::Create {
                    stream,
                    lookup_local,
                } => {
                    let (namespace, name) = parse_stream_key(&stream).map_err(|e| e.to_string())?;
                    let s = client
                        .create_stream(pb::CreateStreamRequest {
                            namespace,
                            name,
                            lookup_local,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.stream_created(&s);
                }
                StreamCommand::Ls { namespace } => {
                    let r = client
                        .list_streams(pb::ListStreamsRequest {
                            namespace: namespace.unwrap_or_default(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.streams(&r.streams);
                }
                StreamCommand::Get { stream } => {
                    let (namespace, name) = parse_stream_key(&stream).map_err(|e| e.to_string())?;
                    let s = client
                        .get_stream(pb::GetStreamRequest { namespace, name })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.stream(&s);
                }
                StreamCommand::Access {
                    stream,
                    allow,
                    deny,
                    remove,
                    reset,
                } => {
                    let (namespace, name) = parse_stream_key(&stream).map_err(|e| e.to_string())?;
                    let s = client
                        .update_stream_access(pb::UpdateStreamAccessRequest {
                            namespace,
                            name,
                            allow,
                            deny,
                            remove,
                            reset,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.access(&s);
                }
                StreamCommand::Policy {
                    stream,
                    key,
                    mode,
                    clear,
                } => {
                    let (namespace, name) = parse_stream_key(&stream).map_err(|e| e.to_string())?;
                    let mut keys = Vec::new();
                    for path in &key {
                        let pem = read_key_file(path)?;
                        keys.push(pb::PolicyKey {
                            name: path
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| path.display().to_string()),
                            pem,
                            ..Default::default()
                        });
                    }
                    let s = client
                        .set_stream_policy(pb::SetStreamPolicyRequest {
                            namespace,
                            name,
                            mode: if clear {
                                String::new()
                            } else {
                                mode.unwrap_or_default()
                            },
                            keys,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.policy(&s);
                }
                StreamCommand::Rm { stream } => {
                    let (namespace, name) = parse_stream_key(&stream).map_err(|e| e.to_string())?;
                    client
                        .delete_stream(pb::DeleteStreamRequest { namespace, name })
                        .await
                        .map_err(status)?;
                    printer.done(&format!("stream {stream} removed"));
                }
            }
            Ok(())
        }
        Command::Tag(cmd) => {
            let mut client = connect(&socket()).await?;
            match cmd {
                TagCommand::Set {
                    tag,
                    source,
                    from_stream,
                    scheduled,
                    interval,
                } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    let source = match (source, from_stream) {
                        (Some(s), _) => s,
                        (None, Some(f)) => {
                            let other = parse_tag_ref(&f).map_err(|e| e.to_string())?;
                            let host = Config::load(None, Overrides::default())
                                .map(|c| c.stream_host)
                                .unwrap_or_else(|_| {
                                    crate::stream::reference::DEFAULT_STREAM_HOST.into()
                                });
                            format!("{host}/{other}")
                        }
                        (None, None) => return Err("give SOURCE or --from-stream".into()),
                    };
                    let r = client
                        .set_tag(pb::SetTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                            source,
                            scheduled,
                            interval_secs: interval.unwrap_or(0),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.tag_moved(&tag, &r);
                }
                TagCommand::Rollback { tag, to_generation } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    let r = client
                        .rollback_tag(pb::RollbackTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                            to_generation: to_generation.unwrap_or(0),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.tag_moved(&tag, &r);
                }
                TagCommand::Import { tag } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    let r = client
                        .import_tag(pb::ImportTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    let t = r.tag.unwrap_or_default();
                    if r.moved || cli.output == Format::Json {
                        printer.tag_moved(&tag, &t);
                    } else {
                        let g = t.generations.first();
                        println!(
                            "{tag} unchanged: its source {} still points at {} (generation {})",
                            t.source,
                            g.map(|g| g.digest.as_str()).unwrap_or("-"),
                            g.map(|g| g.generation).unwrap_or(0)
                        );
                    }
                }
                TagCommand::Verify { tag } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    let r = client
                        .verify_tag(pb::VerifyTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.history(&r);
                    if let Some(g) = r.generations.first().filter(|g| !g.refused.is_empty()) {
                        return Err(format!(
                            "{tag}: generation {} ({}) may not run: {}",
                            g.generation, g.digest, g.refused
                        ));
                    }
                }
                TagCommand::History { tag } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    let r = client
                        .get_tag(pb::GetTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.history(&r);
                }
                TagCommand::Rm { tag } => {
                    let t = parse_tag_ref(&tag).map_err(|e| e.to_string())?;
                    client
                        .delete_tag(pb::DeleteTagRequest {
                            namespace: t.namespace,
                            name: t.name,
                            tag: t.tag,
                        })
                        .await
                        .map_err(status)?;
                    printer.done(&format!("tag {tag} removed"));
                }
            }
            Ok(())
        }
        Command::Metrics => {
            let mut client = connect(&socket()).await?;
            let r = client
                .metrics(pb::MetricsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            print!("{}", r.text);
            Ok(())
        }
        Command::Status => {
            let mut client = connect(&socket()).await?;
            let r = client
                .status(pb::StatusRequest {})
                .await
                .map_err(status)?
                .into_inner();
            printer.status(&r);
            Ok(())
        }
        Command::Watch { filter } => {
            let (namespace, name) = match filter.as_deref() {
                None => (String::new(), String::new()),
                Some(f) if f.contains('/') => parse_stream_key(f).map_err(|e| e.to_string())?,
                Some(f) => {
                    crate::stream::names::validate_namespace(f).map_err(|e| e.to_string())?;
                    (f.to_string(), String::new())
                }
            };
            let mut client = connect(&socket()).await?;
            let mut events = client
                .watch(pb::WatchRequest { namespace, name })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(e) = events.message().await.map_err(status)? {
                printer.event(&e);
            }
            Ok(())
        }
        Command::Cache(cmd) => {
            let mut client = connect(&socket()).await?;
            match cmd {
                CacheCommand::Ls => {
                    let r = client
                        .list_cache(pb::ListCacheRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.cache(&r);
                }
                CacheCommand::Verify => {
                    let r = client
                        .verify_cache(pb::VerifyCacheRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.cache_verified(&r);
                }
                CacheCommand::Rm { digest } => {
                    crate::registry::Digest::parse(&digest)?;
                    let r = client
                        .remove_cache_blob(pb::RemoveCacheBlobRequest {
                            digest: digest.clone(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.done(&format!("removed {digest} ({} bytes)", r.freed_bytes));
                }
                CacheCommand::Gc => {
                    let r = client
                        .gc_cache(pb::GcCacheRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    printer.cache_gc(&r);
                }
            }
            Ok(())
        }
        Command::Mirror(MirrorCommand::HostsToml {
            registry,
            dir,
            mirror,
            config,
            dry_run,
        }) => {
            use crate::mirror::hosts_toml;
            crate::mirror::registry_host::check_registry(&registry)?;
            let config =
                Config::load(config.as_deref(), Overrides::default()).map_err(|e| e.to_string())?;
            let mirror = mirror.unwrap_or_else(|| config.mirror_url());
            crate::mirror::parse_upstream(&mirror).map_err(|e| format!("invalid --mirror: {e}"))?;
            let server = hosts_toml::server_url(&registry, &config.insecure_registries);
            let text = hosts_toml::render(&registry, &server, &mirror);
            if dry_run {
                print!("{text}");
            } else {
                let path = hosts_toml::write(&dir, &registry, &text)?;
                printer.done(&format!(
                    "wrote {}: pulls of {registry} go through {mirror}, then {server}",
                    path.display()
                ));
            }
            Ok(())
        }
        Command::Mirror(MirrorCommand::RegistriesConf {
            registry,
            dir,
            file,
            mirror,
            config,
            print,
        }) => {
            use crate::mirror::registries_conf::{self, DropIn};
            crate::mirror::registry_host::check_registry(&registry)?;
            let config =
                Config::load(config.as_deref(), Overrides::default()).map_err(|e| e.to_string())?;
            let mirror = mirror.unwrap_or_else(|| config.mirror_url());
            let drop_in = DropIn::new(&registry, &mirror, &config.insecure_registries)?;
            let text = drop_in.render();
            if print {
                print!("{text}");
            } else {
                let path = match file {
                    Some(f) => f,
                    None => dir.join(drop_in.file_name()?),
                };
                let path = registries_conf::write(&path, &text)?;
                printer.done(&format!(
                    "wrote {}: CRI-O pulls of {registry} go through {mirror}, then {registry} \
                     (reload CRI-O to apply: systemctl reload crio)",
                    path.display()
                ));
            }
            Ok(())
        }
        Command::Peer(PeerCommand::Certs { dir, nodes }) => {
            let written = crate::peer::tls::generate(&dir, &nodes).map_err(|e| e.to_string())?;
            printer.peer_certs(&dir, &nodes, &written);
            Ok(())
        }
        Command::Resolve {
            reference,
            namespace,
        } => {
            let mut client = connect(&socket()).await?;
            let r = client
                .resolve(pb::ResolveRequest {
                    reference,
                    namespace: namespace.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            printer.resolved(&r);
            Ok(())
        }
    }
}

/// The admin socket clients use without `--admin-socket`: the default config file's, else the
/// embedded default.
fn default_admin_socket() -> PathBuf {
    Config::load(None, Overrides::default())
        .map(|c| c.admin_socket)
        .unwrap_or_else(|_| DEFAULT_ADMIN_SOCKET.into())
}
