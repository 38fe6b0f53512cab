//! `process`: the command from the image's tree as a plain child in its
//! own process group. It outlives the agent process (a successor adopts
//! it); stopping kiln stops it. Nothing stops it from writing where it
//! may, which `status` says.

use kiln_core::service::RuntimeKind;
use tokio::process::Command;

use super::{HostRuntime, Launch, resolve_in_tree};

pub struct Process;

impl Process {
    fn command(&self, l: &Launch, argv: &[String]) -> Command {
        let mut argv = argv.iter();
        let program = argv.next().map_or_else(
            || std::path::PathBuf::from("/bin/false"),
            |first| resolve_in_tree(&l.rootfs, first),
        );
        let mut c = Command::new(program);
        c.args(argv);
        c.env_clear().envs(&l.env);
        for (name, host, _) in &l.volumes {
            c.env(
                format!(
                    "KILN_VOLUME_{}",
                    name.to_uppercase().replace(['-', '.'], "_")
                ),
                host,
            );
        }
        c.current_dir(l.rootfs.join(l.workdir.trim_start_matches('/')));
        // Never as the agent's user when the agent can choose: as root it
        // would own the home (and write `state.db`).
        if let Some(id) = l.user.filter(|id| !id.is_root()) {
            c.uid(id.uid).gid(id.gid);
        }
        c.process_group(0);
        c
    }
}

impl HostRuntime for Process {
    const KIND: RuntimeKind = RuntimeKind::Process;
    const READ_ONLY: bool = false;
    const LAUNCHER: bool = false;

    fn command(&self, launch: &Launch, argv: &[String]) -> Command {
        Process::command(self, launch, argv)
    }

    fn enter(
        &self,
        launch: &Launch,
        _pid: u32,
        argv: &[String],
    ) -> Result<Command, super::RuntimeError> {
        // A plain process has no namespace of its own: the probe runs as
        // the instance would, with its env, in its workdir.
        Ok(Process::command(self, launch, argv))
    }

    fn app(child: u32) -> Option<u32> {
        // The app is the child itself.
        Some(child)
    }
}
