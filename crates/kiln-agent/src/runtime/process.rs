//! `process`: the command from the image's tree as a plain child, killed
//! with the agent via `setpriv --pdeathsig`. Nothing stops it from writing
//! where it may, which `status` says.

use kiln_core::service::RuntimeKind;
use tokio::process::Command;

use super::{HostProcess, Launch, Running, Runtime, RuntimeError, resolve_in_tree};

pub struct Process;

impl Process {
    fn command(&self, l: &Launch, argv: &[String]) -> Command {
        // setpriv (util-linux) sets the parent-death signal before exec, so
        // the instance dies with the agent — without unsafe pre_exec code.
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]);
        let mut argv = argv.iter();
        if let Some(first) = argv.next() {
            c.arg(resolve_in_tree(&l.rootfs, first));
        }
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
        c.process_group(0).kill_on_drop(true);
        c
    }
}

impl Runtime for Process {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn read_only_enforced(&self) -> bool {
        false
    }

    fn spawn(&self, _id: &str, launch: &Launch) -> Result<Box<dyn Running>, RuntimeError> {
        // The app is the child itself.
        Ok(Box::new(HostProcess::spawn(
            self.command(launch, &launch.argv),
            Some,
        )?))
    }

    fn exec(&self, launch: &Launch, argv: &[String]) -> Command {
        self.command(launch, argv)
    }
}
