//! Starting lagprobe from its [settings](crate::settings): the lab when asked for one, the
//! pools and migrations, the [service](crate::service), the heartbeat, and the HTTP and gRPC
//! transports and the PostgreSQL-protocol proxy on their listeners. The only module that imports the transports; tests and
//! the benchmark build the app here exactly as `main` does (the zero2prod way: port 0).

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    db::{self, Databases},
    error::{Error, Result},
    lab::Lab,
    proxy::{self, Backends, ProxyHandle},
    service::{ProxyStats, Service},
    settings::{
        DatabaseSettings, LabSettings, PoolSettings, ProxySettings, Settings, StrategyDefaults,
    },
};

/// A running lagprobe: the lab (if it started one), the service and its servers. Stop it
/// with [`App::shutdown`]; dropping it stops everything at once.
#[derive(Debug)]
pub struct App {
    service: Service,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// The proxy's address, when it runs.
    pub proxy_addr: Option<SocketAddr>,
    proxy: Option<(ProxyHandle, JoinHandle<Result<()>>)>,
    stop: watch::Sender<bool>,
    http_task: JoinHandle<Result<()>>,
    grpc_task: JoinHandle<Result<()>>,
    heartbeat: Option<JoinHandle<()>>,
    // Last, so that on drop the servers stop before the lab's databases do.
    lab: Option<Arc<Lab>>,
}

/// Validates `settings`, starts the lab if they ask for one, migrates, and serves.
pub async fn build(settings: Settings) -> Result<App> {
    settings.validate()?;
    // Before the lab: a taken address fails at once, not after building a cluster.
    let http = bind(settings.http_addr, "http_addr").await?;
    let grpc = bind(settings.grpc_addr, "grpc_addr").await?;
    let http_addr = local_addr(&http, "HTTP")?;
    let grpc_addr = local_addr(&grpc, "gRPC")?;
    let proxy_listener = match settings.proxy.addr {
        Some(addr) => Some(bind(addr, "proxy_addr").await?),
        None => None,
    };
    let proxy_addr = proxy_listener
        .as_ref()
        .map(|listener| local_addr(listener, "proxy"))
        .transpose()?;
    let (lab, service) = connect(&settings).await?;
    let service = service.with_history(settings.probe_history);
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let heartbeat = settings
        .heartbeat
        .filter(|period| !period.is_zero())
        .map(|period| tokio::spawn(service.clone().heartbeat(period)));
    let http_task = tokio::spawn(crate::http::serve(
        http,
        service.clone(),
        until_stopped(stopped.clone()),
    ));
    let grpc_task = tokio::spawn(crate::grpc::serve(
        grpc,
        service.clone(),
        until_stopped(stopped.clone()),
    ));
    let proxy = match proxy_listener {
        Some(listener) => {
            let handle = proxy::handle(
                &settings.proxy,
                settings.defaults,
                proxy_backends(&settings, lab.as_deref())?,
                service.engine().databases().clone(),
                service.proxy_stats().clone(),
            )
            .await;
            let task = proxy::serve(listener, handle.clone(), until_stopped(stopped));
            Some((handle, tokio::spawn(task)))
        }
        None => None,
    };
    tracing::info!(%http_addr, %grpc_addr, ?proxy_addr, "serving");
    Ok(App {
        service,
        http_addr,
        grpc_addr,
        proxy_addr,
        proxy,
        stop,
        http_task,
        grpc_task,
        heartbeat,
        lab,
    })
}

/// The service, on the lab's servers or on the ones the settings name; migrated if asked.
async fn connect(settings: &Settings) -> Result<(Option<Arc<Lab>>, Service)> {
    match &settings.databases {
        DatabaseSettings::External {
            primary_url,
            replica_urls,
        } => {
            let service =
                Service::connect(primary_url, replica_urls, &settings.pool, settings.defaults)?
                    .with_proxy_audit_queries(settings.proxy.audit_queries);
            if settings.migrate {
                service.engine().databases().migrate().await?;
                tracing::info!("migrations applied on the primary");
            }
            Ok((None, service))
        }
        DatabaseSettings::Lab(lab_settings) => {
            let lab = Arc::new(start_lab(lab_settings, settings.migrate, &settings.pool).await?);
            let databases =
                Databases::connect_lazy(&lab.primary_url(), &lab.replica_urls(), &settings.pool)?;
            let service = Service::new(databases, Some(Arc::clone(&lab)), settings.defaults)
                .with_proxy_audit_queries(settings.proxy.audit_queries);
            Ok((Some(lab), service))
        }
    }
}

/// `lagprobe proxy`: the proxy alone, in front of databases someone else runs. Stop it with
/// [`ProxyApp::shutdown`].
#[derive(Debug)]
pub struct ProxyApp {
    pub addr: SocketAddr,
    handle: ProxyHandle,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

/// Validates the proxy settings, binds, and serves on `primary_url` and `replica_urls`.
pub async fn build_proxy(
    primary_url: &str,
    replica_urls: &[String],
    pool: &PoolSettings,
    defaults: StrategyDefaults,
    proxy: &ProxySettings,
) -> Result<ProxyApp> {
    proxy.validate()?;
    let Some(addr) = proxy.addr else {
        return Err(Error::invalid("listen", "the proxy needs an address"));
    };
    let listener = bind(addr, "listen").await?;
    let addr = local_addr(&listener, "proxy")?;
    let backends = Backends::from_urls(primary_url, replica_urls)
        .map_err(|reason| Error::invalid("proxy_backends", reason))?;
    let databases = Databases::connect_lazy(primary_url, &db::name_replicas(replica_urls), pool)?;
    let stats = ProxyStats::new(proxy.audit_queries);
    let handle = proxy::handle(proxy, defaults, backends, databases, stats).await;
    let (stop, mut stopped) = watch::channel(false);
    let until_stopped = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let task = tokio::spawn(proxy::serve(listener, handle.clone(), until_stopped));
    tracing::info!(%addr, "proxy serving");
    Ok(ProxyApp {
        addr,
        handle,
        stop,
        task,
    })
}

impl ProxyApp {
    /// A psql connection string for the proxy.
    pub fn psql_url(&self) -> String {
        self.handle.psql_url(self.addr)
    }

    /// Stops accepting clients.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The proxy's backends: the lab's servers, or the URLs the settings name.
fn proxy_backends(settings: &Settings, lab: Option<&Lab>) -> Result<Backends> {
    let (primary_url, replica_urls) = match (&settings.databases, lab) {
        (_, Some(lab)) => {
            let replicas = lab.replica_urls().into_iter().map(|(_, url)| url).collect();
            (lab.primary_url(), replicas)
        }
        (
            DatabaseSettings::External {
                primary_url,
                replica_urls,
            },
            None,
        ) => (primary_url.clone(), replica_urls.clone()),
        (DatabaseSettings::Lab(_), None) => {
            return Err(Error::FailedPrecondition("the lab did not start".into()));
        }
    };
    Backends::from_urls(&primary_url, &replica_urls)
        .map_err(|reason| Error::invalid("proxy_backends", reason))
}

/// A lab whose migrations (if asked for) have replayed on every replica before the delay
/// engages, so that it is ready to probe as soon as it is up.
pub async fn start_lab(lab: &LabSettings, migrate: bool, pool: &PoolSettings) -> Result<Lab> {
    let lab = Lab::start(lab, async |lab: &Lab| {
        if migrate {
            db::migrate(&lab.primary_url(), pool).await?;
            tracing::info!("migrations applied on the primary");
        }
        Ok::<(), db::DbError>(())
    })
    .await?;
    Ok(lab)
}

/// Binds `addr`; a failure names the setting (`http_addr`, `grpc_addr`: the flags
/// `--http-addr`, `--grpc-addr`).
async fn bind(addr: SocketAddr, setting: &'static str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| Error::invalid(setting, format!("cannot listen on {addr}: {error}")))
}

fn local_addr(listener: &TcpListener, what: &str) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(Error::io(format!("reading the {what} address")))
}

impl App {
    /// What the transports call, for callers in the same process (tests, the benchmark).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The proxy, when it runs.
    pub fn proxy(&self) -> Option<&ProxyHandle> {
        self.proxy.as_ref().map(|(handle, _)| handle)
    }

    /// A psql connection string for the proxy, when it runs.
    pub fn proxy_psql_url(&self) -> Option<String> {
        let handle = self.proxy()?;
        Some(handle.psql_url(self.proxy_addr?))
    }

    /// The lab, when this app started one.
    pub fn lab(&self) -> Option<&Lab> {
        self.lab.as_deref()
    }

    /// Resolves if a transport stops on its own (an accept error), with what stopped it.
    /// A lab server that exits is not a failure: the lab reports it and carries on.
    pub async fn failed(&mut self) -> Error {
        let proxy = async {
            match self.proxy.as_mut() {
                Some((_, task)) => task.await,
                None => std::future::pending().await,
            }
        };
        let finished = tokio::select! {
            finished = &mut self.http_task => finished,
            finished = &mut self.grpc_task => finished,
            finished = proxy => finished,
        };
        match finished {
            Ok(Err(error)) => error,
            Ok(Ok(())) => Error::FailedPrecondition("a server stopped unexpectedly".into()),
            Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
        }
    }

    /// Stops accepting, lets requests in flight finish, waits for both servers, then stops
    /// every lab server (those started again through the fault API too) and only then
    /// removes the lab's directory. Open streams (Watch) end with the servers.
    pub async fn shutdown(mut self) {
        const GRACE: std::time::Duration = std::time::Duration::from_secs(10);
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(GRACE, &mut self.http_task).await;
        let _ = tokio::time::timeout(GRACE, &mut self.grpc_task).await;
        self.http_task.abort();
        self.grpc_task.abort();
        if let Some((_, task)) = self.proxy.take() {
            let _ = tokio::time::timeout(GRACE, task).await;
        }
        if let Some(lab) = self.lab.take() {
            lab.shutdown().await;
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
        self.http_task.abort();
        self.grpc_task.abort();
        if let Some((_, task)) = &self.proxy {
            task.abort();
        }
    }
}
