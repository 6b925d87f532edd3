"""The restart policy: docker's `always` / `on-failure` / `unless-stopped` / `no` for VMs that
stop without the agent or the controller asking, with backoff and a persisted count."""
