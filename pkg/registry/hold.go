package registry

import (
	adminv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/admin/v1"
	eventv1 "github.com/bulkhead-io/bulkhead/pkg/gen/bulkhead/event/v1"
	"github.com/bulkhead-io/bulkhead/pkg/parked"
)

// Hold says whether traffic for d must be parked now instead of delivered,
// and why: disabled, paused, or held by the monitor (quarantined or being
// probed). It is the one rule the router and the deliverer both enforce;
// the deliverer adds what only it knows (a deleted destination, an unusable
// secret).
func Hold(d *adminv1.Destination, s eventv1.State) (parked.Class, bool) {
	switch {
	case !d.GetEnabled():
		return parked.Disabled, true
	case s == eventv1.State_STATE_PAUSED:
		return parked.Paused, true
	case Held(s):
		return parked.Quarantined, true
	}
	return 0, false
}
