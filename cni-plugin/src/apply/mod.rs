//! CONTRACT (to be implemented): firewall backends behind one trait; programming one pod netns.
