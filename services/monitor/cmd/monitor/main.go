// Command monitor watches delivery outcomes, quarantines failing destinations,
// probes and releases them, and serves the operators' AdminService.
package main

import (
	"github.com/bulkhead-io/bulkhead/pkg/service"
	"github.com/bulkhead-io/bulkhead/services/monitor"
)

func main() { service.Main("monitor", monitor.ParseConfig, monitor.Serve) }
