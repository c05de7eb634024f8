// Package keys maps API keys to the tenants they belong to.
package keys

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"

	"github.com/bulkhead-io/bulkhead/pkg/conf"
	"github.com/bulkhead-io/bulkhead/pkg/topology"
)

// ErrUnknownKey is returned by Tenant for a key that belongs to no tenant.
var ErrUnknownKey = errors.New("unknown api key")

// Store holds API keys by their SHA-256, so keys never sit in memory in a
// form a heap dump could replay and lookups cost the same for every key.
type Store struct {
	byHash map[[32]byte]string
}

// Parse reads "key=tenant" pairs. Tenants must be valid ids; keys at least 6
// characters long.
func Parse(pairs []string) (*Store, error) {
	s := &Store{byHash: map[[32]byte]string{}}
	for _, p := range pairs {
		key, tenant, ok := strings.Cut(p, "=")
		if !ok {
			return nil, fmt.Errorf("api key %q: want key=tenant", conf.Mask(p))
		}
		if len(key) < 6 {
			return nil, fmt.Errorf("api key %q: shorter than 6 characters", conf.Mask(key))
		}
		if err := topology.CheckID(tenant); err != nil {
			return nil, fmt.Errorf("api key %q: tenant: %w", conf.Mask(key), err)
		}
		s.byHash[sha256.Sum256([]byte(key))] = tenant
	}
	return s, nil
}

// Tenant returns the tenant of key, or ErrUnknownKey.
func (s *Store) Tenant(key string) (string, error) {
	// The lookup is on a hash of the key, so its timing says nothing useful
	// about the key itself.
	if tenant, ok := s.byHash[sha256.Sum256([]byte(key))]; ok {
		return tenant, nil
	}
	return "", ErrUnknownKey
}

// Tenants lists the distinct tenants.
func (s *Store) Tenants() []string {
	seen := map[string]bool{}
	var out []string
	for _, t := range s.byHash {
		if !seen[t] {
			seen[t] = true
			out = append(out, t)
		}
	}
	return out
}
