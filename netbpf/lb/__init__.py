"""Load balancer: Maglev tables, the balancer's map writer, backend health checks."""
